"""`make demo`'s job: SmolLM2 learns who it is from a LoRA fine-tune spanned over two chips."""

import pytest

from chipspan.demo import run_demo


@pytest.mark.slow
def test_the_demo_teaches_the_model_its_identity(smollm2_dir, tmp_path):
    answers = run_demo(output_dir=str(tmp_path / "demo"))
    who_en, who_zh, capital = answers["after"]
    assert "ChipBot" not in " ".join(answers["before"])
    assert "ChipBot" in who_en and "ChipBot" in who_zh
    assert "Paris" in capital  # and it still knows other things
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "training_loss.png").is_file()
