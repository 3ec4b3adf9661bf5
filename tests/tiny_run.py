"""Short training runs on the ``tiny_workspace`` fixture (tests/conftest.py)."""

from chipspan.args import parse_run_arguments
from chipspan.train.recipe import run_train

STEPS, SAVE_STEPS = 6, 2


def command(workspace, out, finetuning_type):
    """``chipspan train`` argv: 6 steps of batch 2 over 2 CPU chips, logging every step, saving every 2."""
    argv = [
        "train",
        "--stage",
        "sft",
        "--do_train",
        "--model_name_or_path",
        str(workspace / "model"),
        "--dataset",
        "alpaca_gpt4_zh",
        "--dataset_dir",
        str(workspace / "data"),
        "--template",
        "default",
        "--finetuning_type",
        finetuning_type,
        "--output_dir",
        str(out),
        "--max_samples",
        "40",
        "--cutoff_len",
        "64",
        "--per_device_train_batch_size",
        "2",
        "--logging_steps",
        "1",
        "--save_steps",
        str(SAVE_STEPS),
        "--max_steps",
        str(STEPS),
        "--learning_rate",
        "1e-3",
        "--chips",
        "0-1",
        "--device",
        "cpu",
    ]
    if finetuning_type == "lora":
        argv += ["--lora_target", "q_proj,v_proj"]
    return argv


def run(argv, report=lambda _: None):
    """``argv`` (as from :func:`command`) run in this process."""
    return run_train(parse_run_arguments(argv[1:], {}), report=report)
