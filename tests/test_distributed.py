"""One process per chip (torchrun, gloo on CPU) trains the model a single process trains.

The first test starts one 2-process job that runs one training step's forward/backward/clip under
several layouts (GPipe, 1F1B, interleaved 1F1B over 2 pipeline ranks; 2 data-parallel replicas) and
compares every gradient with the single-process ``SpannedModel`` — gradients directly, so a wrong
loss scale shows (as it would under SGD; AdamW would hide it). The others run `chipspan train`
end to end and resume checkpoints across the two ways of running.

Run as a script (``torchrun ... test_distributed.py OUT``) this file is the worker of the first test.
"""

import contextlib
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch
from helpers import losses, make_reference, one_process, torchrun, train_flags

from chipspan.args import parse_run_arguments
from chipspan.chips.placement import even_placement, split_layers
from chipspan.chips.runner import ChipsRunner
from chipspan.chips.span import SpannedModel
from chipspan.models.config import ModelConfig
from chipspan.train.finetune import prepare_trainable

sys.path.insert(0, str(Path(__file__).parent))

BATCH, ACCUMULATION, MICRO_BATCHES, VOCAB = 4, 2, 2, 512
MAX_NORM = 0.1  # small enough that every layout clips
# (name, schedule, finetuning, data_parallel, model): each runs on 2 processes, or on 4 (PP x DP 2 x 2)
LAYOUTS = [
    ("gpipe-lora", "gpipe", "lora", 1, "untied"),
    ("1f1b-lora", "1f1b", "lora", 1, "untied"),
    ("1f1b-full-tied", "1f1b", "full", 1, "tied"),
    ("interleaved-full-tied", "interleaved1f1b", "full", 1, "tied"),
    ("dp2-full-tied", "gpipe", "full", 2, "tied"),
    ("dp2-lora", "1f1b", "lora", 2, "untied"),
]
MESH_LAYOUTS = [
    ("pp2-dp2-full-tied", "1f1b", "full", 2, "tied"),
    ("pp2-dp2-lora", "gpipe", "lora", 2, "untied"),
    ("interleaved-dp2-lora", "interleaved1f1b", "lora", 2, "untied"),
]
# The machines these tests run on allow 2 processes at a time; set this to 4 (or more) on a machine
# with the cores for it to also run the 2 x 2 pipeline x data mesh.
PROCESSES = int(os.environ.get("CHIPSPAN_TEST_PROCESSES", "2"))


def flags(model, finetuning, schedule="1f1b", data_parallel=1):
    lora = ["--lora_target", "q_proj,v_proj"] if finetuning == "lora" else []
    return [
        "--do_train",
        "--model_name_or_path",
        str(model),
        "--dataset",
        "x",
        "--output_dir",
        "unused",
        "--finetuning_type",
        finetuning,
        *lora,
        "--per_device_train_batch_size",
        str(BATCH // data_parallel),
        "--gradient_accumulation_steps",
        str(ACCUMULATION),
        "--micro_batches",
        str(MICRO_BATCHES // data_parallel),
        "--pipeline_schedule",
        schedule,
        "--data_parallel",
        str(data_parallel),
        "--max_grad_norm",
        str(MAX_NORM),
        "--disable_gradient_checkpointing",
    ]


def global_batches():
    """ACCUMULATION batches of BATCH rows, padded on the right, prompts not trained."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for length in (24, 16):
        ids = torch.randint(0, VOCAB, (BATCH, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length - 5 :] = 0
        labels = torch.where(mask.bool(), ids, -100)
        labels[:, :6] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def perturb(named_parameters, tied):
    """Move every trained parameter by a fixed, name-seeded amount (a fresh LoRA B is zero: A would get
    no gradient); a tied head copy moves as the embedding it copies."""
    with torch.no_grad():
        for name, p in named_parameters:
            if p.requires_grad:
                name = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(0.02 * torch.randn(p.shape, generator=g))


# --- the worker -------------------------------------------------------------------------------------


def worker(out: Path, layouts: list) -> None:
    import torch.distributed as dist

    from chipspan.distributed.mesh import plan_layout, start
    from chipspan.distributed.pipeline import VIRTUAL_STAGES
    from chipspan.distributed.runner import RankRunner
    from chipspan.distributed.stage import load_stage
    from chipspan.distributed.trainable import prepare_stages
    from chipspan.precision import Precision, choose_precision

    rank, world, device = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.device("cpu")
    for name, schedule, finetuning, data_parallel, model in layouts:
        folder = out / model
        run = parse_run_arguments(flags(folder, finetuning, schedule, data_parallel), {})
        layout = plan_layout(world, rank, data_parallel, VIRTUAL_STAGES[schedule])
        mesh = start(layout, device, run.training.ddp_timeout)
        config = ModelConfig.from_folder(folder)
        torch.manual_seed(42)
        split = split_layers(config.num_hidden_layers, layout.num_stages)
        pieces = [load_stage(folder, config, split, s, torch.float32, device) for s in layout.stages]
        for piece in pieces:
            piece.gradient_checkpointing = False
        prepare_stages(pieces, config, run.finetuning, None)
        initial = {
            n: p.detach().clone()
            for piece in pieces
            for n, p in piece.named_parameters(remove_duplicate=False)
            if p.requires_grad
        }
        for piece in pieces:
            perturb(piece.named_parameters(), config.tie_word_embeddings)
        precision = Precision(choose_precision(run, device.type))
        micro_batches = MICRO_BATCHES // data_parallel * ACCUMULATION
        runner = RankRunner(
            layout, device, mesh, pieces, schedule, micro_batches, BATCH // data_parallel, 0, torch.float32, precision
        )
        loss = runner.forward_backward(global_batches(), loss_scale=1.0)
        norm = runner.clip_gradients(MAX_NORM)
        grads = {
            n: p.grad for piece in pieces for n, p in piece.named_parameters(remove_duplicate=False) if p.requires_grad
        }
        torch.save({"loss": loss, "norm": norm, "grads": grads, "initial": initial}, out / f"{name}-rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


# --- the tests ----------------------------------------------------------------------------------------


def reference(folder, finetuning):
    """One process, one chip: loss, norm before clipping and clipped gradients of the step."""
    run = parse_run_arguments(flags(folder, finetuning), {})
    torch.manual_seed(42)
    config = ModelConfig.from_folder(folder)
    model = SpannedModel.load(folder, even_placement(config, [torch.device("cpu")]), torch.float32)
    prepare_trainable(list(model.stages), run.finetuning)
    initial = {
        n: p.detach().clone() for n, p in model.stages[0].named_parameters(remove_duplicate=False) if p.requires_grad
    }
    perturb(model.stages[0].named_parameters(), config.tie_word_embeddings)
    runner = ChipsRunner(model, 1, contextlib.nullcontext)
    loss = runner.forward_backward(global_batches(), loss_scale=1.0)
    norm = runner.clip_gradients(MAX_NORM)
    grads = {n: p.grad for n, p in model.stages[0].named_parameters(remove_duplicate=False) if p.requires_grad}
    return loss, norm, grads, initial


def run_layouts(tmp_path, layouts, processes):
    """Run ``layouts`` on ``processes`` ranks and compare each with one process."""
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    make_reference(tmp_path / "untied", "llama2-mha", **shape)
    make_reference(tmp_path / "tied", "smollm-tied", **shape)
    torchrun(Path(__file__), tmp_path, "mesh" if layouts is MESH_LAYOUTS else "pairs", processes=processes, timeout=300)
    expected = {model: {ft: reference(tmp_path / model, ft) for ft in ("lora", "full")} for model in ("untied", "tied")}
    for name, _, finetuning, data_parallel, model in layouts:
        loss, norm, grads, initial = expected[model][finetuning]
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(processes)]
        assert ranks[0]["loss"] == pytest.approx(loss, rel=1e-6), name
        assert all(r["norm"] == pytest.approx(norm, rel=1e-5) for r in ranks), name
        assert norm > MAX_NORM, "the clipping must act for the test to check it"
        held = {}
        for r in ranks[::data_parallel]:  # replica 0 of each pipeline position (rank = position x dp + replica)
            held.update(r["grads"])
        for r in ranks:
            assert all(torch.equal(r["initial"][k], initial[k]) for k in r["initial"]), f"{name}: initial weights"
        for first in range(0, processes, data_parallel):  # the replicas hold the same summed gradients
            for replica in ranks[first + 1 : first + data_parallel]:
                assert all(torch.equal(ranks[first]["grads"][k], replica["grads"][k]) for k in ranks[first]["grads"]), (
                    name
                )
        assert set(held) == set(grads), name
        for key, grad in grads.items():
            torch.testing.assert_close(held[key], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.multiprocess
def test_every_schedule_and_data_parallel_give_the_gradients_of_one_process(tmp_path):
    run_layouts(tmp_path, LAYOUTS, processes=2)


@pytest.mark.multiprocess
@pytest.mark.skipif(
    PROCESSES < 4,
    reason="the 2 x 2 mesh needs 4 processes: set CHIPSPAN_TEST_PROCESSES=4 on a machine with the cores for it",
)
def test_pipeline_by_data_mesh_gives_the_gradients_of_one_process(tmp_path):
    run_layouts(tmp_path, MESH_LAYOUTS, processes=4)


# end to end: `chipspan train` under torchrun, checkpoints across the two ways of running


def weights(folder):
    """Every tensor of an HF model folder, single-file or sharded."""
    from safetensors.torch import load_file

    from chipspan.models.weights import weight_files

    return {k: v for file in weight_files(folder) for k, v in load_file(file).items()}


def assert_same_weights(ours, theirs):
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=2e-5, rtol=0) for k in theirs)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_checkpoints_move_between_two_stages_and_one_process(tiny_workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from chipspan.train.checkpoints import read_optimizer_state

    single = tmp_path / "single"  # one process, checkpoint-2 on the way
    one_process(train_flags(tiny_workspace, single, "--overwrite_output_dir"))
    straight = losses(single)

    staged = tmp_path / "staged"  # two stages, 1F1B, micro-batches: each stage writes its own share
    torchrun(
        "-m",
        "chipspan",
        "train",
        *train_flags(tiny_workspace, staged, "--overwrite_output_dir", "--micro_batches", "2"),
    )
    assert losses(staged) == straight
    assert_same_weights(weights(staged), weights(single))
    shares = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "optimizer-stage0-of-2.pt",
        "optimizer-stage1-of-2.pt",
    ]
    assert all((staged / "checkpoint-2" / f).is_file() for f in shares)
    assert not any((staged / "checkpoint-2" / f).exists() for f in ("model.safetensors", "optimizer.pt"))
    expected = weights(single / "checkpoint-2")
    assert_same_weights(weights(staged / "checkpoint-2"), expected)
    ours, theirs = read_optimizer_state(staged / "checkpoint-2"), read_optimizer_state(single / "checkpoint-2")
    assert ours["state"].keys() == theirs["state"].keys()
    decay = {kind: group["weight_decay"] for kind, group in theirs["groups"].items()}
    assert {kind: group["weight_decay"] for kind, group in ours["groups"].items()} == decay
    hf = AutoModelForCausalLM.from_pretrained(staged / "checkpoint-2", torch_dtype=torch.float32).state_dict()
    assert_same_weights({k: hf[k] for k in expected}, expected)  # transformers reads the stages' shards

    assert_same_weights(weights(staged / "checkpoint-4"), weights(single / "checkpoint-4"))  # the last step's
    one_process(train_flags(tiny_workspace, staged, "--resume_from_checkpoint", staged / "checkpoint-2"))
    assert losses(staged) == straight

    shutil.copytree(single / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train_flags(tiny_workspace, tmp_path / "resumed", "--pipeline_schedule", "gpipe", "--save_only_model")
    torchrun("-m", "chipspan", "train", *resumed)
    saved = {p.name for p in (tmp_path / "resumed" / "checkpoint-4").iterdir()}
    assert set(shares[:3]) <= saved and not saved & {"optimizer-stage0-of-2.pt", "scheduler.pt", "rng_state.pth"}
    assert_same_weights(weights(tmp_path / "resumed" / "checkpoint-4"), weights(single / "checkpoint-4"))
    assert [
        line["current_steps"]
        for line in map(json.loads, (tmp_path / "resumed" / "trainer_log.jsonl").read_text().splitlines())
    ] == [3, 4]
    assert losses(tmp_path / "resumed") == straight[2:]


def test_one_process_per_chip_flags_without_torchrun_are_refused(tiny_workspace, tmp_path):
    from chipspan.errors import ChipspanError

    for flags in (["--data_parallel", "2"], ["--pipeline_schedule", "gpipe"]):
        with pytest.raises(ChipspanError, match=r"set how one process per chip runs: add --launcher torchrun"):
            one_process(train_flags(tiny_workspace, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), MESH_LAYOUTS if sys.argv[2] == "mesh" else LAYOUTS)


@pytest.mark.multiprocess
def test_a_diverging_run_stops_on_every_rank_and_writes_no_final_weights(tiny_workspace, tmp_path):
    """The one-process NonFiniteGuard under torchrun: the ranks agree on the step's loss and stop together."""
    out = tmp_path / "out"
    argv = train_flags(tiny_workspace, out, "--learning_rate", "1e30", "--max_steps", "6")
    result = torchrun("-m", "chipspan", "train", *argv, succeed=False)
    assert result.stderr.count("chipspan: error: training diverged: steps 2-4 all had a non-finite loss") == 2
    assert not list(out.glob("model*.safetensors")) and (out / "checkpoint-2").is_dir()
