"""This rank's stages of a torchrun pipeline: how ``chipspan.train.step.TrainStep`` runs a step here.

Every rank draws the same global batches (per_device_train_batch_size × data_parallel examples, see
``chipspan.train.loop``), so step N sees what a single process with that batch size sees. Replica r
takes rows [r·B, (r+1)·B) of each accumulation batch; the step's accumulation batches, padded to one
length, run as one ``--pipeline_schedule`` of micro_batches × gradient_accumulation_steps
micro-batches. Each micro-batch's token-loss sum is weighted by 1 / (trained tokens of its global
batch × accumulation steps), which makes the step's loss and gradients those of the single process:
the token mean of each batch, averaged over the accumulation steps.

Replicas' gradients are *summed* by DDP (the weights already divide by the global batch's tokens);
the global norm and the tied embeddings are joined over the pipeline ranks (``chipspan.chips.gradients``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from chipspan.chips.gradients import (
    clip_global_norm,
    global_norm,
    sum_tied_gradients,
    tied_copies,
    trained_parameters,
)
from chipspan.data.encode import IGNORE_INDEX
from chipspan.devices import index_dtype
from chipspan.distributed.mesh import Layout, tied_group
from chipspan.distributed.pipeline import PipelineRunner
from chipspan.distributed.replicas import data_parallel
from chipspan.distributed.stage import PipelinePiece
from chipspan.models.decoder import CausalLM
from chipspan.precision import Precision


class RankRunner:
    def __init__(
        self,
        layout: Layout,
        device: torch.device,
        mesh,
        pieces: list[CausalLM],
        schedule: str,
        micro_batches_per_step: int,
        batch_size: int,
        pad_id: int,
        activation_dtype: torch.dtype,
        precision: Precision,
    ):
        """``pieces``: this rank's stages, in order; ``micro_batches_per_step``: those of all the
        step's accumulation batches together; ``batch_size``: this replica's rows of each
        accumulation batch; ``activation_dtype``: what crosses between stages."""
        self.layout, self.device, self.batch_size, self.pad_id = layout, device, batch_size, pad_id
        self.replica, self.replicas = layout.replica, layout.data
        self.data_group, self.pipeline_group = mesh.get_group("data"), mesh.get_group("pipeline")
        trains = any(p.requires_grad for piece in pieces for p in piece.parameters())
        modules = [PipelinePiece(piece, activation_dtype, precision.autocast) for piece in pieces]
        if layout.data > 1 and trains:
            modules = [data_parallel(module, self.data_group, device) for module in modules]
        self.modules = modules
        hidden_size = pieces[0].config.hidden_size
        self.pipeline = PipelineRunner(
            modules,
            layout.stages,
            layout.num_stages,
            schedule,
            micro_batches_per_step,
            device,
            self.pipeline_group,
            hidden_size,
            activation_dtype,
        )
        tied = pieces[0].config.tie_word_embeddings and layout.num_stages > 1
        self.tied_group = tied_group(layout) if tied else None  # every rank creates the groups
        self.embedding_copies, self.head_copies = tied_copies(pieces, layout.num_stages)
        self.trained = trained_parameters(pieces, self.head_copies)

    def set_training(self, mode: bool) -> None:
        for module in self.modules:
            module.train(mode)

    def forward_backward(self, batches: list[dict[str, torch.Tensor]], loss_scale: float) -> float:
        """Forward and backward of this replica's rows of the step's global ``batches``, as one
        schedule; returns the step's loss (every rank's last stages added)."""
        rows = self.replica_rows(batches)
        local = self.pipeline.step(rows, loss_scale)
        return self.sum_over_ranks(local or 0.0)

    def replica_rows(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """This replica's rows of the step's global batches, padded to one length and stacked:
        input_ids, attention_mask, labels (accumulation · B, s) and loss_weight (accumulation · B,) fp32."""
        length = max(b["input_ids"].shape[1] for b in batches)
        rows = slice(self.replica * self.batch_size, (self.replica + 1) * self.batch_size)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        parts = {
            key: [F.pad(b[key][rows], (0, length - b[key].shape[1]), value=value) for b in batches]
            for key, value in fill.items()
        }
        counts = [_trained_tokens(labels) for labels in parts["labels"]]
        counts = torch.tensor(counts, dtype=index_dtype(self.device), device=self.device)
        dist.all_reduce(counts, group=self.data_group)  # trained tokens of each global batch
        weights = 1.0 / (counts.cpu().clamp_min(1).double() * len(batches))
        stacked = {key: torch.cat(values) for key, values in parts.items()}
        stacked["loss_weight"] = weights.float().repeat_interleave(self.batch_size)
        return stacked

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient this rank applies (a tied head copy's too)."""
        return [p.grad for p in self.trained + self.head_copies if p.grad is not None]

    def join_tied_gradients(self) -> None:
        """Give both copies of a tied embedding the sum of their gradients, over their two ranks."""
        tied = self.tied_group
        sum_tied_gradients(
            self.embedding_copies + self.head_copies,
            (lambda total: dist.all_reduce(total, group=tied)) if tied is not None else None,
        )

    def clip_gradients(self, max_norm: float) -> float:
        """Sum the tied copies' gradients over their two ranks, clip the norm over the pipeline."""
        self.join_tied_gradients()
        return clip_global_norm(
            self.trained,
            max_norm,
            self.device,
            also_scaled=self.head_copies,
            reduce=self._sum_over_pipeline,
        )

    def gradient_norm(self, norms: list[torch.Tensor]) -> float:
        """The global norm over the pipeline of gradients already applied, from their own norms."""
        return float(global_norm(norms, self.device, self._sum_over_pipeline))

    def _sum_over_pipeline(self, total: torch.Tensor) -> None:
        dist.all_reduce(total, group=self.pipeline_group)

    def forward_only(self, batch: dict[str, torch.Tensor]) -> float | None:
        """The token-mean loss of one whole batch on the rank with the last stage, else None."""
        batch = {
            **batch,
            "loss_weight": torch.full((len(batch["labels"]),), 1.0 / max(_trained_tokens(batch["labels"]), 1)),
        }
        return self.pipeline.forward_only(batch)

    def sum_over_ranks(self, value: float) -> float:
        return float(self._reduced(value, dist.ReduceOp.SUM))

    def max_over_ranks(self, value: float) -> float:
        return float(self._reduced(value, dist.ReduceOp.MAX))

    def any_rank(self, flag: bool) -> bool:
        return bool(self._reduced(float(flag), dist.ReduceOp.MAX))

    def _reduced(self, value: float, op) -> torch.Tensor:
        """``value`` reduced over every rank, in float64 so that a learning rate arrives as it left."""
        total = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(total, op=op)
        return total


def _trained_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss targets in ``labels`` (b, s): those after a row's first that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
