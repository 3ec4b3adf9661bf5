"""GPipe micro-batches (chipspan.chips.pipeline): the whole batch's loss and gradients, exactly,
over CPU stages and emulated chips, packed or padded; `train --micro_batches`."""

import json

import pytest
import torch
from helpers import LF05_LORA, lf05_command, make_reference
from torch.utils._python_dispatch import TorchDispatchMode

from chipspan import emu
from chipspan.args import FinetuningArguments, parse_run_arguments
from chipspan.chips import span
from chipspan.chips.gradients import sum_tied_gradients, tied_copies
from chipspan.chips.pipeline import pipelined_loss
from chipspan.chips.placement import even_placement
from chipspan.chips.span import SpannedModel
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.train.finetune import prepare_trainable
from chipspan.train.recipe import run_train

VOCAB = 131
TOLERANCE = 1e-6  # relative


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    _, folder = make_reference(tmp_path_factory.mktemp("pipeline"), "llama2-mha", num_hidden_layers=4)
    return folder


def spanned(folder, chips: list[torch.device], finetuning: str) -> SpannedModel:
    """The model over ``chips``; LoRA's B matrices drawn at random, so that A gets a gradient too."""
    model = SpannedModel.load(folder, even_placement(ModelConfig.from_folder(folder), chips), torch.float32)
    prepare_trainable(list(model.stages), FinetuningArguments(finetuning_type=finetuning, lora_target="all"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param, device="cpu") * 0.1)
    return model


def a_batch(rows=5, length=16, packed=False) -> dict[str, torch.Tensor]:
    """Prompt tokens masked out, a padded last row and (from 3 rows) a row with nothing to train;
    or three packed examples a row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    if packed:
        mask[:] = torch.tensor([1] * 6 + [2] * 5 + [3] * 3 + [0] * (length - 14))
        labels[:, [6, 11]] = -100  # each example's first label (chipspan.data.packing)
    else:
        mask[-1, 11:] = 0
        if rows > 2:
            labels[1] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sgd_step(model: SpannedModel, loss_of) -> tuple[float, dict, dict]:
    """(loss, gradients, weights after one SGD step) of ``loss_of(model)``; the weights are put back."""
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    sum_tied_gradients(sum(tied_copies(list(model.stages), len(model.stages)), []))  # as the step does
    grads = {n: p.grad.cpu() for n, p in trained.items()}
    torch.optim.SGD(trained.values(), lr=0.5).step()
    after = {n: p.detach().cpu() for n, p in trained.items()}
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(before[n])
    return loss.item(), grads, after


def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def check_micro_batches_match_the_plain_batch(model, batch, micro_batches=(1, 2, 3)) -> float:
    """Largest relative difference of loss, gradients and SGD-stepped weights, over each M."""
    plain = sgd_step(model, lambda m: m(batch["input_ids"], batch["labels"], batch["attention_mask"]))
    assert all(g.norm() > 0 for g in plain[1].values())  # every trained tensor gets a gradient
    worst = 0.0
    for m in micro_batches:
        loss, grads, weights = sgd_step(model, lambda model_, m=m: pipelined_loss(model_, batch, m))
        worst = max(
            worst,
            abs(loss - plain[0]) / plain[0],
            *(relative(grads[n], plain[1][n]) for n in grads),
            *(relative(weights[n], plain[2][n]) for n in weights),
        )
        assert worst <= TOLERANCE, (m, worst)
    return worst


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_micro_batches_give_the_batch_loss_and_gradients_on_cpu_stages(model_dir, stages, finetuning):
    model = spanned(model_dir, [torch.device("cpu")] * stages, finetuning)
    check_micro_batches_match_the_plain_batch(model, a_batch())  # 5 rows: M = 3 is 2 + 2 + 1


def test_tied_embeddings_on_two_chips_get_the_batch_gradient(tmp_path):
    _, folder = make_reference(tmp_path, "smollm-tied", num_hidden_layers=2)
    model = spanned(folder, [torch.device("cpu")] * 2, "full")
    assert all(tied_copies(list(model.stages), 2))
    check_micro_batches_match_the_plain_batch(model, a_batch())


def test_packed_rows_stay_apart_in_micro_batches(model_dir):
    model = spanned(model_dir, [torch.device("cpu")] * 2, "full")
    check_micro_batches_match_the_plain_batch(model, a_batch(rows=4, packed=True), micro_batches=(2, 3))


def test_more_micro_batches_than_rows_runs_one_row_each(model_dir):
    # the last batch of an epoch may be short: no error, one micro-batch per row
    model = spanned(model_dir, [torch.device("cpu")] * 2, "full")
    check_micro_batches_match_the_plain_batch(model, a_batch(rows=2), micro_batches=(4,))


needs_emu = pytest.mark.skipif(not emu.is_available(), reason="the emu device cannot be built here (no C++ compiler?)")


@needs_emu
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_micro_batches_give_the_batch_loss_and_gradients_on_emulated_chips(model_dir, finetuning):
    emu.enable(num_chips=2)
    model = spanned(model_dir, [torch.device("emu", i) for i in range(2)], finetuning)
    check_micro_batches_match_the_plain_batch(model, a_batch())


class ChipReadbacks(TorchDispatchMode):
    """Records every op whose result the host must wait for: a value or tensor read back from a
    chip, or a chip op whose output shape depends on the chip's data."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_chip = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
        to_host = func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        if on_chip and (
            to_host or func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
        ):
            self.seen.append(func)
        return func(*args, **kwargs)


@needs_emu
def test_a_pipelined_step_never_waits_on_a_chip_for_its_token_count(model_dir):
    # on an asynchronous chip each read-back stalls the host until the chip drains; the wavefront
    # would then issue one stage at a time
    emu.enable(num_chips=2)
    model = spanned(model_dir, [torch.device("emu", i) for i in range(2)], "lora")
    with ChipReadbacks() as readbacks:
        loss = pipelined_loss(model, a_batch(rows=4), 4)
        loss.backward()
    assert readbacks.seen == []
    with ChipReadbacks() as readbacks:  # the check itself sees a read-back: labels on a chip go to the host
        model.loss(
            torch.zeros(1, 3, model.config.hidden_size, device="emu:1"),
            torch.ones(1, 3, dtype=torch.long, device="emu:1"),
        )
    assert readbacks.seen


def test_wavefront_order_puts_every_stage_to_work(model_dir, monkeypatch):
    # 3 stages, 3 micro-batches: clock t runs stage s on micro-batch t - s
    model = spanned(model_dir, [torch.device("cpu")] * 3, "lora")
    calls = []
    forward = SpannedModel.stage_forward

    def record(self, i, x, positions, mask):
        calls.append((i, x.shape[0]))
        return forward(self, i, x, positions, mask)

    monkeypatch.setattr(SpannedModel, "stage_forward", record)
    pipelined_loss(model, a_batch(rows=6), 3)
    assert [stage for stage, _ in calls] == [0, 0, 1, 0, 1, 2, 1, 2, 2]
    assert {rows for _, rows in calls} == {2}


# --- `train --micro_batches` ---------------------------------------------------------------------


def test_train_with_micro_batches_logs_the_same_losses(lf05_workspace, tmp_path, monkeypatch):
    def losses(out, *extra):
        argv = lf05_command(
            LF05_LORA,
            lf05_workspace,
            out,
            "--max_steps",
            "4",
            "--save_steps",
            "0",
            "--max_samples",
            "12",
            "--per_device_train_batch_size",
            "3",
            "--learning_rate",
            "1e-3",
            "--fp16",
            "false",
            *extra,
        )
        run_train(parse_run_arguments(argv, {"SOPHGO_SPLIT": "2"}), report=lambda _: None)
        return [line["loss"] for line in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())]

    plain = losses(tmp_path / "plain")
    rows = set()
    forward = SpannedModel.stage_forward

    def record(self, i, x, positions, mask):
        rows.add(x.shape[0])
        return forward(self, i, x, positions, mask)

    monkeypatch.setattr(SpannedModel, "stage_forward", record)
    pipelined = losses(tmp_path / "pipelined", "--micro_batches", "2")
    assert rows == {2, 1}, "train did not cut its batches of 3 into micro-batches of 2 + 1"
    assert len(pipelined) == 4 and max(abs(a - b) for a, b in zip(pipelined, plain)) <= 1e-4


def test_more_micro_batches_than_examples_is_refused_before_loading(model_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(span, "load_pretrained", refuse)
    argv = [
        "--do_train",
        "--model_name_or_path",
        str(model_dir),
        "--dataset",
        "any",
        "--output_dir",
        str(tmp_path / "out"),
        "--finetuning_type",
        "full",
        "--per_device_train_batch_size",
        "2",
        "--micro_batches",
        "3",
        "--device",
        "cpu",
    ]
    with pytest.raises(ChipspanError) as error:
        run_train(parse_run_arguments(argv, {}))
    assert str(error.value) == (
        "--micro_batches 3 must be between 1 and per_device_train_batch_size (2): "
        "each micro-batch needs at least one example"
    )
