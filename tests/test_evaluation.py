"""Evaluation and prediction: eval_loss as a hand computation gives it, evaluation while training,
generated answers, and what a run reports (TensorBoard, per-chip memory)."""

import json

import pytest
import torch
import transformers
from helpers import command, run

from chipspan.args import parse_run_arguments
from chipspan.data import collate
from chipspan.data.encode import last_answer
from chipspan.data.loader import load_dataset_split
from chipspan.errors import ChipspanError
from chipspan.models.tokenizer import Tokenizer


def eval_only(tiny_workspace, out, *extra):
    argv = command(tiny_workspace, out, "lora")
    argv.remove("--do_train")
    return argv + ["--do_eval", "--max_samples", "12", "--per_device_eval_batch_size", "5", *extra]


def test_eval_loss_equals_a_hand_computation_with_transformers(tiny_workspace, tmp_path):
    out = tmp_path / "eval"
    run(eval_only(tiny_workspace, out))
    reported = json.loads((out / "eval_results.json").read_text())

    # every row is evaluated without --do_train; batches of 5, 5, 2 in data order
    args = parse_run_arguments(eval_only(tiny_workspace, out)[1:], {})
    tokenizer = Tokenizer.from_folder(tiny_workspace / "model")
    examples = list(load_dataset_split(args.data, tokenizer, use_cache=False).train)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_workspace / "model", dtype=torch.float32)
    total = 0.0
    for start in range(0, len(examples), 5):
        batch = collate(examples[start : start + 5], tokenizer.pad_token_id)
        with torch.no_grad():
            loss = reference(**batch).loss  # mean over the batch's trained tokens
        total += float(loss) * len(examples[start : start + 5])
    assert len(examples) == 12
    assert reported["eval_loss"] == pytest.approx(total / 12, rel=1e-5)
    assert reported["perplexity"] == pytest.approx(torch.tensor(total / 12).exp().item(), rel=1e-5)


def test_evaluation_while_training_is_logged_and_plotted(tiny_workspace, tmp_path):
    out = tmp_path / "train"
    argv = command(tiny_workspace, out, "lora") + [
        "--val_size",
        "4",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "3",
        "--do_eval",
        "--plot_loss",
    ]
    run(argv)
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    evals = [(line["current_steps"], line["eval_loss"]) for line in lines if line["eval_loss"] is not None]
    assert [step for step, _ in evals] == [3, 6]
    final = json.loads((out / "eval_results.json").read_text())
    assert final["eval_loss"] == pytest.approx(evals[-1][1])  # the same weights, the same rows
    assert (out / "training_eval_loss.png").stat().st_size > 1000
    assert (out / "training_loss.png").is_file()


def test_evaluating_while_training_without_held_out_rows_is_refused(tiny_workspace, tmp_path):
    argv = command(tiny_workspace, tmp_path / "out", "lora") + ["--eval_strategy", "steps"]
    with pytest.raises(ChipspanError, match="needs held-out rows: pass --val_size"):
        run(argv)


def test_predictions_are_the_greedy_answers_transformers_gives(tiny_workspace, tmp_path):
    out = tmp_path / "predict"
    argv = eval_only(
        tiny_workspace, out, "--do_predict", "--do_sample", "false", "--max_new_tokens", "6", "--max_samples", "3"
    )
    run(argv)
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "predict", "label"}
    assert json.loads((out / "predict_results.json").read_text())["predict_runtime"] > 0

    args = parse_run_arguments(argv[1:], {})
    tokenizer = Tokenizer.from_folder(tiny_workspace / "model")
    example = load_dataset_split(args.data, tokenizer, use_cache=False).train[0]
    prompt, answer = last_answer(example)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_workspace / "model", dtype=torch.float32)
    expected = reference.generate(
        torch.tensor([prompt]),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert rows[0]["predict"] == tokenizer.decode(expected[0, len(prompt) :].tolist())
    assert rows[0]["label"] == tokenizer.decode(answer) and rows[0]["prompt"] == tokenizer.decode(prompt)


def test_tensorboard_gets_every_logged_number(tiny_workspace, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run(command(tiny_workspace, out, "lora") + ["--report_to", "tensorboard"])
    events = EventAccumulator(str(out / "runs")).Reload()
    losses = {e.step: round(e.value, 4) for e in events.Scalars("train/loss")}  # stored as float32
    logged = {
        line["current_steps"]: line["loss"]
        for line in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
    }
    assert losses == logged and len(logged) == 6
    assert "train/learning_rate" in events.Tags()["scalars"]


def test_unknown_report_target_is_refused_before_loading(tiny_workspace, tmp_path):
    with pytest.raises(ChipspanError, match="^--report_to neptune: a tracker chipspan does not log to"):
        run(command(tiny_workspace, tmp_path / "out", "lora") + ["--report_to", "neptune"])
    with pytest.raises(ChipspanError, match="^--report_to wandbx is not one of none, tensorboard, wandb, mlflow"):
        run(command(tiny_workspace, tmp_path / "out", "lora") + ["--report_to", "wandbx"])
