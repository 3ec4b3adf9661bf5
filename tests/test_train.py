"""`chipspan train` end to end: LLaMA-Factory 0.5's command lines, chips, resume, and one-line errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import DEMO_DATA, LF05_LORA, LLAMA2_TOKENIZER, command, lf05_command, losses, make_reference, run
from safetensors.torch import load_file

from chipspan import emu, manifest
from chipspan.adapters.peft_io import adapter_state_dict
from chipspan.args import parse_run_arguments
from chipspan.chips import span
from chipspan.chips.placement import even_placement, split_layers
from chipspan.cli import main
from chipspan.errors import ChipspanError
from chipspan.models.config import ModelConfig
from chipspan.train import checkpoints
from chipspan.train.finetune import prepare_trainable
from chipspan.train.recipe import run_train

LF05_FULL = (
    LF05_LORA.replace("--finetuning_type lora --lora_target q_proj,v_proj", "--finetuning_type full")
    .replace("--save_steps 10", "--save_steps 100")
    .replace("--num_train_epochs 4.0", "--num_train_epochs 3.0")
)
# LLaMA-Factory 0.5's four jobs: (command, chips) for 7B LoRA, 13B LoRA, 7B full, 13B full.
LF05_JOBS = [(LF05_LORA, 2), (LF05_LORA, 4), (LF05_FULL, 11), (LF05_FULL, 21)]


@pytest.mark.parametrize("command,chips", LF05_JOBS, ids=["7b-lora-2", "13b-lora-4", "7b-full-11", "13b-full-21"])
def test_lf05_command_lines_run_and_write_its_outputs(lf05_workspace, tmp_path, command, chips, capsys):
    out = tmp_path / "out"
    argv = lf05_command(command, lf05_workspace, out, "--max_steps", "2", "--save_steps", "1")
    run = parse_run_arguments(argv, {"SOPHGO_SPLIT": str(chips), "CHIPS": "0"})
    run_train(run, report=print)
    printed = capsys.readouterr().out
    assert f"placement over {chips} chip(s)" in printed
    assert printed.count("\n  chip ") == chips

    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [line["current_steps"] for line in lines] == [1, 2]
    assert {"loss", "learning_rate", "epoch", "percentage", "elapsed_time", "remaining_time"} <= set(lines[0])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["log_history"][-1]["train_loss"] > 0
    assert json.loads((out / "train_results.json").read_text())["epoch"] > 0
    assert (out / "all_results.json").is_file() and (out / "training_loss.png").stat().st_size > 1000
    assert (out / "tokenizer.json").is_file()
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]  # 2: the end
    checkpoint = out / "checkpoint-2"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "tokenizer.json"):
        assert (checkpoint / name).is_file(), name
    if "lora" in command:
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16, ["q_proj", "v_proj"])
        keys = load_file(out / "adapter_model.safetensors").keys()
        assert len(keys) == 22 * 2 * 2  # 22 layers x (q, v) x (A, B)
        assert (checkpoint / "adapter_model.safetensors").is_file()
    else:
        weights = load_file(out / "model.safetensors")
        assert len(weights) == 3 + 22 * 9 and all(t.dtype == torch.float32 for t in weights.values())
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 22


def train_losses(lf05_workspace, out, chips, *extra, steps=6):
    argv = lf05_command(
        LF05_LORA,
        lf05_workspace,
        out,
        "--max_steps",
        str(steps),
        "--save_steps",
        "0",
        "--max_samples",
        "24",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        *extra,
    )
    run_train(parse_run_arguments(argv, {"SOPHGO_SPLIT": str(chips)}), report=lambda _: None)
    return [line["loss"] for line in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_any_number_of_chips_trains_the_same_model(lf05_workspace, tmp_path, finetuning):
    extra = ["--finetuning_type", "full"] if finetuning == "full" else []
    one = train_losses(lf05_workspace, tmp_path / "one", 1, *extra)
    for chips in (2, 5):
        assert train_losses(lf05_workspace, tmp_path / f"c{chips}", chips, *extra) == one
    name = "adapter_model.safetensors" if finetuning == "lora" else "model.safetensors"
    reference = load_file(tmp_path / "one" / name)
    for chips in (2, 5):
        spanned = load_file(tmp_path / f"c{chips}" / name)
        assert spanned.keys() == reference.keys()
        assert all(torch.allclose(spanned[k], reference[k], atol=1e-6) for k in reference)


needs_emu = pytest.mark.skipif(not emu.is_available(), reason="the emu device cannot be built here (no C++ compiler?)")


@pytest.mark.slow
@needs_emu
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_emulated_chips_train_the_same_model_as_one_cpu(lf05_workspace, tmp_path, finetuning):
    # fp32 on both: with LLaMA-Factory 0.5's --fp16, emu (like a real chip) computes in fp16
    extra = ["--fp16", "false"] + (["--finetuning_type", "full"] if finetuning == "full" else [])
    one = train_losses(lf05_workspace, tmp_path / "cpu", 1, *extra, steps=10)
    name = "adapter_model.safetensors" if finetuning == "lora" else "model.safetensors"
    reference = load_file(tmp_path / "cpu" / name)
    for chips in (2, 4):
        out = tmp_path / f"emu{chips}"
        losses = train_losses(
            lf05_workspace, out, chips, *extra, "--device", "emu", "--chips", f"0-{chips - 1}", steps=10
        )
        assert max(abs(a - b) for a, b in zip(losses, one)) <= 1e-5 and len(losses) == 10
        spanned = load_file(out / name)
        assert all(torch.allclose(spanned[k], reference[k], atol=1e-6, rtol=0) for k in reference)


@needs_emu
def test_every_stage_lives_on_its_own_emulated_chip(lf05_workspace):
    emu.enable(num_chips=4)
    placement = even_placement(
        ModelConfig.from_folder(lf05_workspace / "model"), [torch.device("emu", i) for i in range(4)]
    )
    model = span.SpannedModel.load(lf05_workspace / "model", placement, torch.float32)
    prepare_trainable(
        list(model.stages),
        parse_run_arguments(lf05_command(LF05_LORA, lf05_workspace, lf05_workspace / "x")).finetuning,
    )
    for chip, stage in enumerate(model.stages):
        assert {p.device for p in stage.parameters()} == {torch.device("emu", chip)}
    ids = torch.randint(0, 32000, (1, 16))
    model(ids, ids).backward()  # crossing chips only at the stage boundaries: a stray tensor would raise
    assert all(p.grad.device == p.device for p in model.parameters() if p.requires_grad)


@needs_emu
def test_rehearsal_reports_each_chips_peak_and_fails_like_the_hardware(lf05_workspace, tmp_path, monkeypatch, capsys):
    argv = lf05_command(
        LF05_LORA,
        lf05_workspace,
        tmp_path / "ok",
        "--max_steps",
        "1",
        "--max_samples",
        "4",
        "--device",
        "emu",
        "--chips",
        "0-1",
        "--chip_memory",
        "1GiB",
    )
    code, _ = run_cli(argv, {}, monkeypatch, capsys)
    assert code == 0
    results = json.loads((tmp_path / "ok" / "train_results.json").read_text())
    peaks = [results[f"chip{i}_peak_memory_bytes"] for i in range(2)]
    assert all(0 < peak < 2**30 for peak in peaks)
    argv = lf05_command(
        LF05_LORA,
        lf05_workspace,
        tmp_path / "oom",
        "--max_steps",
        "1",
        "--max_samples",
        "4",
        "--device",
        "emu",
        "--chips",
        "0-1",
        "--chip_memory",
        "3MiB",
    )
    code, err = run_cli(argv, {}, monkeypatch, capsys)
    emu.set_memory_limit(None)
    assert code == 1 and len(err) == 1 and "out of memory" in err[0] and "emu:" in err[0]


def test_tied_embeddings_spanned_over_chips_stay_one_matrix(tmp_path):
    """Full fine-tuning of a tied model: the embedding (first chip) and head (last chip) copies get
    the summed gradient, so they stay equal and match the one-device run."""
    _, model = make_reference(tmp_path / "model", "smollm-tied", vocab_size=32000, num_hidden_layers=4)
    for file in LLAMA2_TOKENIZER.iterdir():
        shutil.copy(file, model)
    (tmp_path / "data").mkdir()
    shutil.copy(DEMO_DATA / "alpaca_zh_demo.json", tmp_path / "data" / "alpaca_gpt4_data_zh.json")
    results = {}
    for chips in (1, 3):
        argv = lf05_command(
            LF05_FULL,
            tmp_path,
            tmp_path / f"out{chips}",
            "--max_steps",
            "3",
            "--max_samples",
            "8",
            "--learning_rate",
            "1e-3",
        )
        run_train(parse_run_arguments(argv, {"SOPHGO_SPLIT": str(chips)}), report=lambda _: None)
        results[chips] = load_file(tmp_path / f"out{chips}" / "model.safetensors")
    assert "lm_head.weight" not in results[3]
    assert all(torch.allclose(results[3][k], results[1][k], atol=1e-6) for k in results[1])


@pytest.mark.slow
def test_a_stopped_run_resumes_from_its_last_checkpoint(lf05_workspace, tmp_path):
    straight = train_losses(lf05_workspace, tmp_path / "straight", 2)
    out = tmp_path / "resumed"
    argv = lf05_command(
        LF05_LORA,
        lf05_workspace,
        out,
        "--max_steps",
        "6",
        "--save_steps",
        "4",
        "--max_samples",
        "24",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
    )
    run_train(parse_run_arguments(argv, {"SOPHGO_SPLIT": "2"}), report=lambda _: None)
    manifest.remove_sealed(out / "checkpoint-6", checkpoints.CHECKPOINT)  # as if stopped before the end
    argv.remove("--overwrite_output_dir")  # LLaMA-Factory 0.5's way: the same command again resumes
    messages = []
    run_train(parse_run_arguments(argv, {"SOPHGO_SPLIT": "3"}), report=messages.append)
    assert any("resuming from" in m and "checkpoint-4 at step 4" in m for m in messages)
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [line["current_steps"] for line in log] == [1, 2, 3, 4, 5, 6]
    assert [line["loss"] for line in log] == straight  # steps 5-6 again, on 3 chips instead of 2


# --- the last step is a checkpoint, as the HF Trainer saves one -----------------------------------


def saved_steps(out):
    return sorted(checkpoints.checkpoint_step(p) for p in checkpoints.checkpoint_folders(out))


@pytest.mark.parametrize(
    "flags,saved",
    [
        (["--max_steps", "2", "--save_steps", "1"], [1, 2]),
        (["--max_steps", "3", "--save_steps", "5"], [3]),
        (["--max_steps", "3", "--save_steps", "2"], [2, 3]),
        (["--max_steps", "3", "--save_steps", "1", "--save_total_limit", "2"], [2, 3]),  # the last one rotates too
        (["--max_steps", "2", "--save_steps", "0"], []),
    ],
)
def test_the_last_step_is_saved_as_a_checkpoint(tiny_workspace, tmp_path, flags, saved):
    out = tmp_path / "out"
    run(command(tiny_workspace, out, "lora") + flags)
    assert saved_steps(out) == saved
    if saved:
        last = out / f"checkpoint-{saved[-1]}"
        assert checkpoints.damage(last) is None
        assert (last / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


CONSTANT = ["--lr_scheduler_type", "constant", "--save_steps", "2"]  # the schedule does not depend on max_steps


def test_a_finished_run_is_kept_and_continues_only_with_more_steps(tiny_workspace, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    run(command(tiny_workspace, straight, "lora") + [*CONSTANT, "--max_steps", "5"])
    out = tmp_path / "out"
    finished = command(tiny_workspace, out, "lora") + [*CONSTANT, "--max_steps", "3"]
    run(finished)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refusals = []
    for again in (finished, [*finished, "--max_steps", "2"]):  # the same command; fewer steps
        with monkeypatch.context() as patched:
            patched.setattr(span, "load_pretrained", lambda *a, **k: pytest.fail("weights loaded before the error"))
            code, err = run_cli(again[1:], {}, patched, capsys)
        assert code == 1 and len(err) == 1, err
        assert "raise --max_steps (or --num_train_epochs) above 3 to train further" in err[0]
        assert "--overwrite_output_dir to start again" in err[0]
        refusals.append(err[0])
    assert f"the run in {out} is finished: checkpoint-3 is its last step (3)" in refusals[0]
    assert "checkpoint-3 is at step 3, past this run's 2 steps" in refusals[1]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    (out / "trainer_state.json").unlink()  # as a kill after checkpoint-3, before the outputs, leaves it
    (out / "adapter_model.safetensors").unlink()
    run(finished)  # writes the outputs of its end
    assert (out / "adapter_model.safetensors").read_bytes() == before[Path("adapter_model.safetensors")]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3 and saved_steps(out) == [2, 3]

    messages = []
    run([*finished, "--max_steps", "5"], report=messages.append)
    assert any(m.endswith("checkpoint-3 at step 3") for m in messages)
    assert losses(out) == losses(straight) and saved_steps(out) == [2, 3, 4, 5]
    trained, expected = (load_file(d / "adapter_model.safetensors") for d in (out, straight))
    assert all(torch.equal(trained[name], expected[name]) for name in expected)


# --- bad input: one line, before any weight is read ----------------------------------------------


def run_cli(argv, env, monkeypatch, capsys):
    for name in ("USE_SOPHGO", "SOPHGO_SPLIT", "CHIPS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["train", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "change,env,message",
    [
        (["--lora_rnak", "4"], {}, "unknown flag --lora_rnak (did you mean --lora_rank?)"),
        (["--dataset", "alpaca_gpt5_zh"], {}, "alpaca_gpt5_zh"),
        (["--dataset", "alpaca_gpt4_en"], {}, "alpaca_gpt4_data_en.json"),
        ([], {"SOPHGO_SPLIT": "23"}, "23 chips asked for (SOPHGO_SPLIT / --chips) but the model has only 22"),
        (["--device", "cuda"], {"SOPHGO_SPLIT": "2", "CHIPS": "3"}, "chip 3 does not exist"),
        (["--lora_target", "none"], {}, "LoRA needs --lora_target"),
        (
            ["--lora_target", "q_proj,qkv"],
            {},
            "lora_target 'qkv' matches no module; this model has: down_proj, gate_proj",
        ),
        (["--stage", "ppo"], {}, "--stage ppo: a preference stage, which chipspan does not run yet (sft, pt)"),
        (["--stage", "spt"], {}, "--stage spt is not one of sft, pt"),
        ([], {"USE_SOPHGO": "1"}, "device 'tpu' needs the PyTorch plugin 'torch_tpu'"),
    ],
)
def test_bad_input_gets_one_line(
    lf05_workspace, tmp_path, change, env, message, no_weight_loading, monkeypatch, capsys
):
    argv = lf05_command(LF05_LORA, lf05_workspace, tmp_path / "out") + change
    code, err = run_cli(argv, env, monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("chipspan: error: ")
    assert message in err[0]


def test_non_empty_output_dir_is_refused_and_kept(lf05_workspace, tmp_path, no_weight_loading, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = [a for a in lf05_command(LF05_LORA, lf05_workspace, out) if a != "--overwrite_output_dir"]
    code, err = run_cli(argv, {}, monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and "is not empty and holds no checkpoint" in err[0]
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_lora_spanned_stages_hold_their_own_layers(lf05_workspace):
    assert [len(r) for r in split_layers(22, 4)] == [6, 6, 5, 5]  # uneven: the head's chip gets fewer
    run = parse_run_arguments(lf05_command(LF05_LORA, lf05_workspace, lf05_workspace / "unused"))
    placement = even_placement(ModelConfig.from_folder(lf05_workspace / "model"), [torch.device("cpu")] * 4)
    model = span.SpannedModel.load(lf05_workspace / "model", placement, torch.float32)
    prepare_trainable(list(model.stages), run.finetuning)
    keys = [set(adapter_state_dict(stage)) for stage in model.stages]
    assert [len(k) for k in keys] == [24, 24, 20, 20] and not set.intersection(*keys)


def test_checkpoints_that_cannot_fit_on_disk_are_refused_before_loading(
    lf05_workspace, tmp_path, no_weight_loading, monkeypatch, capsys
):
    free = shutil.disk_usage(tmp_path).free
    # full fine-tuning of this 2.3M-parameter model: ~27.6 MB per checkpoint (fp32 weights + AdamW)
    steps = int(free // 27_000_000) + 10
    argv = lf05_command(
        LF05_FULL, lf05_workspace, tmp_path / "out", "--max_steps", str(steps), "--save_steps", "1", "--fp16", "false"
    )
    code, err = run_cli(argv, {}, monkeypatch, capsys)
    assert code == 1 and len(err) == 1
    assert "would not fit on disk" in err[0] and "--save_total_limit" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "free, advice",
    [
        (10_500, "pass --save_total_limit 3 (or fewer)"),  # 3 kept + 1 being written + the final 6,000
        (7_500, "no rotation of checkpoints fits beside the final outputs: pass --save_steps 0"),
        (5_000, "even the final outputs do not fit"),
    ],
)
def test_the_disk_refusal_advises_what_can_fit(tmp_path, monkeypatch, free, advice):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6 - free, free))
    with pytest.raises(ChipspanError, match="would not fit on disk") as refused:
        checkpoints.check_disk_space(
            tmp_path,
            steps=100,
            save_steps=1,
            save_total_limit=None,
            checkpoint_bytes=1_000,
            final_bytes=6_000,
            report=print,
        )
    assert advice in str(refused.value)


def test_resume_from_a_named_checkpoint(lf05_workspace, tmp_path):
    out = tmp_path / "out"
    argv = lf05_command(LF05_LORA, lf05_workspace, out, "--max_steps", "4", "--save_steps", "2", "--max_samples", "8")
    run_train(parse_run_arguments(argv, {}), report=lambda _: None)
    messages = []
    again = argv + ["--resume_from_checkpoint", str(out / "checkpoint-2")]  # despite --overwrite_output_dir
    run_train(parse_run_arguments(again, {}), report=messages.append)
    assert any("checkpoint-2 at step 2" in m for m in messages)
    with pytest.raises(ChipspanError, match="not a checkpoint folder"):
        run_train(parse_run_arguments(argv + ["--resume_from_checkpoint", str(tmp_path)], {}), report=print)


def without_eom_id(llama3_tokenizer_dir, folder):
    """A tiny model whose tokenizer (Llama 3.2's, 128,257 tokens) lacks ``<|eom_id|>``, as Llama 3.0's does:
    LLaMA-Factory 0.9's llama3 template adds it as a stop word, past the model's 128,257 embeddings."""
    make_reference(folder, "llama2-mha", vocab_size=128257, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (llama3_tokenizer_dir / name).read_text(encoding="utf-8")
        (folder / name).write_text(text.replace('"<|eom_id|>"', '"<|reserved_eom|>"'), encoding="utf-8")
    return folder


@pytest.mark.parametrize("answer, trains", [("Fine.", True), ("Fine.<|eom_id|>", False)])
def test_a_stop_word_past_the_embeddings_trains_until_the_data_uses_it(llama3_tokenizer_dir, tmp_path, answer, trains):
    model = without_eom_id(llama3_tokenizer_dir, tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"rows": {"file_name": "rows.json"}}))
    rows = [{"instruction": f"How are you, {i}?", "input": "", "output": answer} for i in range(4)]
    (data / "rows.json").write_text(json.dumps(rows))
    argv = [
        *("--stage", "sft", "--do_train", "--model_name_or_path", str(model), "--dataset", "rows"),
        *("--dataset_dir", str(data), "--template", "llama3", "--template_revision", "lf-0.9"),
        *("--finetuning_type", "lora", "--lora_target", "q_proj,v_proj", "--output_dir", str(tmp_path / "out")),
        *("--max_steps", "1"),
    ]
    messages = []
    if trains:
        run_train(parse_run_arguments(argv, {}), report=messages.append)
        assert len(losses(tmp_path / "out")) == 1
        assert any(
            m.startswith("note: the tokenizer has 128258 tokens") and "<|eom_id|> (id 128257)) are never used" in m
            for m in messages
        )
    else:
        with pytest.raises(ChipspanError, match=r"needs ids beyond it: <\|eom_id\|> \(id 128257\)"):
            run_train(parse_run_arguments(argv, {}), report=messages.append)
        assert not (tmp_path / "out").exists()
