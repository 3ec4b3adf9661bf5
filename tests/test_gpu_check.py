"""bench/gpu_check.py without a GPU: its dry run prints every row, its parity rows pass (the CPU
against itself agrees exactly), and bad input is one line before anything runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chipspan import assets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

PARITY = ["parity-lora", "parity-full", "bf16-lora", "two-chips", "two-stages"]
SPEED = ["speed-lora", "speed-full", "vs-hf-peft"]
MEMORY = ["memory-lora-chip0", "memory-full-chip0"]
ROWS = [*PARITY, "speed-lora", "memory-lora-chip0", "speed-full", "memory-full-chip0", "vs-hf-peft"]


@pytest.fixture(scope="module")
def llama2_tokenizer():
    """The Llama-2 tokenizer (32,000 tokens), fetched once and cached by chipspan.assets."""
    return assets.fetch_llama2_tokenizer()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_dry_run_prints_every_row_and_the_parity_rows_pass(tmp_path, llama2_tokenizer):
    rows_file = tmp_path / "rows.json"
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry", "--tokenizer", str(llama2_tokenizer)]
    command += ["--workdir", str(tmp_path / "work"), "--json", str(rows_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run (--dry)" in done.stderr

    rows = {row["key"]: row for row in json.loads(rows_file.read_text())}
    assert list(rows) == ROWS
    for key in PARITY:
        assert rows[key]["result"] == "pass", rows[key]
        assert rows[key]["numbers"]["max_relative_difference"] == 0.0, rows[key]
        assert len(rows[key]["numbers"]["losses"]) == gpu_check.DRY.parity_steps
    for key in SPEED:
        assert rows[key]["result"] == "dry", rows[key]
    assert rows["speed-lora"]["numbers"]["tokens_per_s"] > 0 and rows["speed-full"]["numbers"]["tokens_per_s"] > 0
    assert rows["vs-hf-peft"]["numbers"]["ratio"] > 0  # transformers and peft are test dependencies
    for key in MEMORY:
        assert rows[key]["result"] == "dry: cpu reports no memory", rows[key]

    table = done.stdout.strip().splitlines()  # the table is all that goes to stdout
    assert table[:2] == ["| check | measured | reference | result |", "|---|---|---|---|"]
    assert table[2:] == [
        f"| {r['check']} | {r['measured']} | {r['reference']} | {r['result']} |" for r in rows.values()
    ]
    assert {p.name for p in (tmp_path / "work").iterdir()} == {"model", "data", "runs", "cache"}
    assert not [p for p in tmp_path.iterdir() if p.name not in ("work", rows_file.name)]


def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, llama2_tokenizer):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cases = {
        ("--tokenizer", str(tmp_path)): f"--tokenizer {tmp_path} holds no tokenizer.json",
        ("--tokenizer", str(llama2_tokenizer), "--workdir", str(tmp_path / "busy")): "is not a new or empty folder",
        ("--json", str(tmp_path / "missing" / "rows.json")): "its folder does not exist",
    }
    for argv, message in cases.items():
        assert gpu_check.main(["--dry", *argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, err
        assert err.startswith("gpu_check: error: ") and message in err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
