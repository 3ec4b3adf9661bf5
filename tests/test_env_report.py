"""``chipspan env``: the versions, chips and chip variables a bug report needs."""

import importlib.metadata
import json
import os

from chipspan import env_report
from chipspan.cli import main


def test_the_report_names_versions_chips_and_chip_variables(monkeypatch, capsys):
    monkeypatch.setenv("SOPHGO_SPLIT", "2")
    monkeypatch.setenv("HOME_UNRELATED", "x")
    assert main(["env", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packages"]["torch"] == importlib.metadata.version("torch")
    assert report["device_type"] == "cpu" and report["chips"] == [{"device": "cpu", "note": "host memory"}]
    assert report["variables"]["SOPHGO_SPLIT"] == "2" and "HOME_UNRELATED" not in report["variables"]
    assert report["cpu_cores"] == os.cpu_count()


def test_a_device_whose_plugin_is_missing_is_reported_not_raised(capsys):
    assert main(["env", "--device", "npu"]) == 0
    printed = capsys.readouterr().out
    assert "device npu: not available (device 'npu' needs the PyTorch plugin 'torch_npu'" in printed
    assert "torch-npu: not installed" in printed


def test_googles_torch_tpu_from_pypi_is_named_as_not_sophgos(tmp_path, monkeypatch):
    """PyPI's torch-tpu is Google's TPU plugin: it imports as torch_tpu too, and is no use on an SC7."""
    info = tmp_path / "torch_tpu-0.2.0.dist-info"
    info.mkdir()
    metadata = "Metadata-Version: 2.1\nName: torch_tpu\nVersion: 0.2.0\nHome-page: https://github.com/google-pytorch/torch_tpu\n"
    (info / "METADATA").write_text(metadata)
    monkeypatch.syspath_prepend(str(tmp_path))
    notes = env_report.collect("cpu")["plugin_notes"]
    assert len(notes) == 1 and "is Google's TPU plugin" in notes[0] and "Sophgo's SDK" in notes[0]
