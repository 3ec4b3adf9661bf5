"""Running one batch through the pipeline with ``torch.distributed.pipelining``.

Batches are padded to their own longest example, so the shape of the hidden states that cross a
stage boundary changes from batch to batch. The stages are therefore declared with static shapes
(no metadata inference pass) and rebuilt, cheaply, whenever a batch's shape differs from the last.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from chipspan.chips.memory import VIRTUAL_STAGES
from chipspan.devices import index_dtype
from chipspan.errors import ChipspanError
from chipspan.models.decoder import default_position_ids

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved1f1b": ScheduleInterleaved1F1B}
assert SCHEDULES.keys() == VIRTUAL_STAGES.keys()
# torch >= 2.9 can be told not to keep the last stage's outputs; torch 2.8 would pass the flag on to forward
KEEP_NO_OUTPUTS = (
    {"return_outputs": False} if "return_outputs" in inspect.signature(ScheduleGPipe.step).parameters else {}
)


def check_schedule(name: str, micro_batches: int | None, batch_size: int) -> None:
    """Refuse a batch that does not split into the micro-batches (None: the plan chooses them)."""
    if micro_batches is not None and (micro_batches < 1 or batch_size % micro_batches):
        raise ChipspanError(
            f"per_device_train_batch_size {batch_size} does not split into --micro_batches "
            f"{micro_batches}: use a batch size that is a multiple of it"
        )


class PipelineRunner:
    """This rank's stages of one pipeline and the schedule that drives them.

    ``modules``: the rank's stage modules (``PipelinePiece``, perhaps DDP-wrapped), ``stage_ids``
    their stage indices; ``micro_batches`` per step (every batch splits into that many equal
    parts); ``hidden_size``/``activation_dtype`` describe what crosses between stages.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        stage_ids: list[int],
        num_stages: int,
        schedule: str,
        micro_batches: int,
        device: torch.device,
        group: dist.ProcessGroup,
        hidden_size: int,
        activation_dtype: torch.dtype,
    ):
        self.modules, self.stage_ids, self.num_stages = modules, stage_ids, num_stages
        self.schedule_class = SCHEDULES[schedule]
        self.micro_batches, self.device, self.group = micro_batches, device, group
        self.hidden_size, self.activation_dtype = hidden_size, activation_dtype
        self._shape: tuple[int, int] | None = None
        self._schedule = None
        self._loss_scale = 1.0

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def step(self, batch: dict[str, torch.Tensor], loss_scale: float = 1.0) -> float | None:
        """Forward and backward of one batch: input_ids, attention_mask, labels (b, s) and
        loss_weight (b,); gradients accumulate into .grad, multiplied by ``loss_scale`` (the fp16 loss
        scale: the last stage scales its loss, the backward carries it through every stage).

        Returns the sum of the (unscaled) micro-batch losses on the rank with the last stage, else None.
        """
        self._loss_scale = loss_scale
        shape = tuple(batch["input_ids"].shape)
        if shape != self._shape:
            self._schedule, self._shape = self._build(*shape), shape
        inputs = self._on_chip(batch)
        mask, positions = inputs["attention_mask"], inputs["position_ids"]
        args = (inputs["input_ids"],) if 0 in self.stage_ids else ()
        if not self.has_last_stage:
            self._schedule.step(*args, attention_mask=mask, position_ids=positions, **KEEP_NO_OUTPUTS)
            return None
        losses: list[torch.Tensor] = []
        labels = inputs["labels"]
        self._schedule.step(
            *args,
            attention_mask=mask,
            position_ids=positions,
            labels=labels,
            loss_weight=inputs["loss_weight"],
            target=labels,
            losses=losses,
            **KEEP_NO_OUTPUTS,
        )
        return float(torch.stack(losses).detach().sum()) / loss_scale

    @torch.no_grad()
    def forward_only(self, batch: dict[str, torch.Tensor]) -> float | None:
        """Forward of one whole batch (evaluation), no schedule and no micro-batches: the stages run in
        order, each rank as the hidden states reach its stages (blocking send/recv over the pipeline
        group). Returns the last stage's weighted loss on the rank holding it, else None."""
        inputs = self._on_chip(batch)
        mask, positions, (b, s) = inputs["attention_mask"], inputs["position_ids"], inputs["input_ids"].shape
        pipeline_ranks = dist.get_world_size(self.group)  # stage k runs on pipeline rank k % pipeline_ranks
        hidden: torch.Tensor | None = None
        for index, module in sorted(zip(self.stage_ids, self.modules), key=lambda pair: pair[0]):
            module = getattr(module, "module", module)  # DDP's wrapped module: no gradient sync to prepare
            if index == 0:
                hidden = inputs["input_ids"]
            elif index - 1 not in self.stage_ids:
                hidden = torch.empty(b, s, self.hidden_size, dtype=self.activation_dtype, device=self.device)
                dist.recv(hidden, group=self.group, group_src=(index - 1) % pipeline_ranks)
            if index == self.num_stages - 1:
                return float(module(hidden, mask, positions, inputs["labels"], inputs["loss_weight"]))
            hidden = module(hidden, mask, positions)
            if index + 1 not in self.stage_ids:
                dist.send(hidden.contiguous(), group=self.group, group_dst=(index + 1) % pipeline_ranks)
        return None

    def _on_chip(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` on this rank's chip, ids and masks in its index dtype, with the positions
        (position_ids (b, s)) counted on the host from the attention mask."""
        b, s = batch["input_ids"].shape
        positions = default_position_ids(batch["attention_mask"], b, s, 0, self.device)
        index = index_dtype(self.device)
        on_chip = {k: v.to(self.device, v.dtype if v.is_floating_point() else index) for k, v in batch.items()}
        return {**on_chip, "position_ids": positions}

    def _build(self, batch_size: int, seq_len: int):
        micro = batch_size // self.micro_batches
        hidden = torch.empty(
            micro, seq_len, self.hidden_size, dtype=self.activation_dtype, device="meta", requires_grad=True
        )
        stages = []
        for module, index in zip(self.modules, self.stage_ids):
            first, last = index == 0, index == self.num_stages - 1
            inputs = torch.empty(micro, seq_len, dtype=torch.long, device="meta") if first else hidden
            outputs = torch.empty(1, dtype=torch.float32, device="meta") if last else hidden
            stages.append(
                PipelineStage(
                    module,
                    index,
                    self.num_stages,
                    self.device,
                    input_args=inputs,
                    output_args=outputs,
                    group=self.group,
                )
            )
        single = self.schedule_class is not ScheduleInterleaved1F1B
        return self.schedule_class(
            stages[0] if single else stages, self.micro_batches, loss_fn=self._scaled_loss, scale_grads=False
        )

    def _scaled_loss(self, loss: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        """The last stage already returns its weighted loss (1,); only the loss scale is left to apply."""
        return (loss * self._loss_scale).sum()
