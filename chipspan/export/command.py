"""``chipspan export``: a base model with its adapters merged, as a Hugging Face folder or a GGUF file.

Everything is checked before a weight loads: the flags, the output folder, each adapter against the
base, the template against the tokenizer. The folder is written beside its place and renamed into it
when complete (``sealed_output``), so a failed export leaves nothing behind and replaces nothing.
What it holds: the weights (sharded by ``export_size``), ``config.json`` naming their dtype,
``generation_config.json`` whose EOS ids include the template's stop words, and the tokenizer whose
``tokenizer_config.json`` carries the trained template as its chat template.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from chipspan.adapters.peft_io import adapter_folders, check_adapters, run_adapters
from chipspan.args import RunArguments
from chipspan.data.template_auto import ChatTemplate
from chipspan.data.templates import Template, fix_tokenizer, run_template
from chipspan.devices import chip_devices, default_device_type, parse_chip_ids, prepare_device_type
from chipspan.errors import ChipspanError
from chipspan.export.chat_template import chat_template_for
from chipspan.export.merge import merged_parts, tensor_shapes, write_merged
from chipspan.models.config import ModelConfig
from chipspan.models.gguf_export import check_config, tokenizer_metadata, write_gguf
from chipspan.models.tokenizer import Tokenizer
from chipspan.models.weights import parse_size
from chipspan.paths import check_output, run_inputs
from chipspan.sealed_output import check_replaceable, writing

EXPORTED = "exported"  # the manifest kind of an export folder
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_export(run: RunArguments, say=lambda line: print(line, file=sys.stderr)) -> Path:
    """Export as ``run`` says; returns the folder written. ``say`` gets the progress lines."""
    export = run.export
    out = _check_flags(run)
    base = Path(run.model.model_name_or_path)
    config = ModelConfig.from_folder(base)
    gguf = export.export_format == "gguf"
    if gguf:
        check_config(config)
    adapters = adapter_folders(run.model.adapter_name_or_path)
    check_adapters(config, adapters)
    dtype = _export_dtype(export.infer_dtype, config)
    tokenizer, stop_words = _exported_tokenizer(run, base, config, say)
    if gguf:
        tokenizer_metadata(tokenizer, config.vocab_size)  # refuses a tokenizer a GGUF cannot hold
    device = _merge_device(run)
    settings = {"base": str(base.resolve()), "adapters": [str(a.resolve()) for a in adapters], "dtype": str(dtype)}
    if gguf:
        settings = {**settings, "dtype": None, "gguf": export.export_quantization}
    with writing(out, EXPORTED, settings) as folder:
        if gguf:
            _write_gguf(
                folder, out.name, base, adapters, config, tokenizer, stop_words, export.export_quantization, device, say
            )
        else:
            _write_hf(folder, base, adapters, config, tokenizer, stop_words, dtype, run, device, say)
    return out


def _check_flags(run: RunArguments) -> Path:
    """The export folder, once the flags and the paths are known to be usable."""
    export = run.export
    if not run.model.model_name_or_path:
        raise ChipspanError("chipspan export needs --model_name_or_path: the base model folder")
    if not export.export_dir:
        raise ChipspanError("chipspan export needs --export_dir: the folder to write the exported model in")
    run_adapters(run.model.adapter_name_or_path, run.finetuning.finetuning_type)
    if run.model.quantization_bit is not None:
        raise ChipspanError(
            "--quantization_bit: export merges adapters into the unquantized base (a merged 4- or 8-bit "
            "weight would be rounded); drop it, or export --export_format gguf --export_quantization q8_0"
        )
    if "export_quantization" in run.given and export.export_format != "gguf":
        raise ChipspanError("--export_quantization applies to --export_format gguf; drop it for a Hugging Face folder")
    if export.export_format == "gguf":
        for flag, why in (
            ("export_legacy_format", "writes .bin weights"),
            ("export_size", "shards a Hugging Face folder"),
            ("infer_dtype", "sets a Hugging Face folder's dtype (a GGUF's is --export_quantization)"),
        ):
            if flag in run.given:
                raise ChipspanError(f"--{flag} {why}; a GGUF export is one file: drop it")
    out = Path(export.export_dir)
    check_output(out, "--export_dir", run_inputs(run))
    check_replaceable(out, EXPORTED, "chipspan export", run.training.overwrite_output_dir, "add --overwrite_output_dir")
    shard_bytes(export.export_size)
    return out


def shard_bytes(export_size: str) -> int:
    """Bytes per shard: a whole number is GB (LLaMA-Factory's ``export_size``), else a size like 500MB."""
    text = str(export_size).strip()
    try:
        size = parse_size(f"{text}GB" if re.fullmatch(r"\d+", text) else text)
    except ChipspanError:
        size = 0
    if size <= 0:
        raise ChipspanError(f"--export_size {export_size}: must be GB per shard above 0 (e.g. 5) or a size like 500MB")
    return size


def _export_dtype(infer_dtype: str, config: ModelConfig) -> torch.dtype:
    """``--infer_dtype``, or with ``auto`` the base's own dtype (fp32 when its config names none)."""
    if infer_dtype != "auto":
        return DTYPES[infer_dtype]
    return DTYPES.get(config.torch_dtype or "float32", torch.float32)


def _exported_tokenizer(run: RunArguments, base: Path, config: ModelConfig, say) -> tuple[Tokenizer, tuple[str, ...]]:
    """The base's tokenizer fixed for the template trained with, carrying it as its chat template;
    and the template's stop words. Without ``--template`` the model's own chat template stays."""
    tokenizer = Tokenizer.from_folder(base)
    if "template" not in run.given:
        say(
            "note: no --template: the model's own chat template is kept; name the template you trained "
            "with so chat endpoints format prompts as training did"
        )
        return tokenizer, ()
    data = run.data
    template = run_template(data, tokenizer)
    fix_tokenizer(tokenizer, template)
    if len(tokenizer) > config.vocab_size:
        raise ChipspanError(
            f"template '{data.template}' adds tokens to the tokenizer ({len(tokenizer)} > the model's "
            f"{config.vocab_size} embeddings): export with the template you trained with"
        )
    if isinstance(template, ChatTemplate):
        return tokenizer, ()
    _set_chat_template(tokenizer, template, say)
    return tokenizer, template.stop_words


def _set_chat_template(tokenizer: Tokenizer, template: Template, say) -> None:
    written = chat_template_for(template, tokenizer)
    tokenizer.chat_template = written.source
    name = f"template '{template.name}' ({template.revision})"
    if not written.differences:
        say(f"chat template: {name}; it gives training's ids on every probe conversation")
        return
    where = "in later turns' history" if written.first_prompts_agree else "already in a first prompt"
    say(
        f"note: chat template: {name} differs from training's ids {where} ({len(written.differences)} "
        f"checks, e.g. {written.differences[0]}): training tokenizes each template piece alone, and this "
        "tokenizer merges some pieces with their neighbours in one text; chipspan chat --template encodes "
        "exactly as training"
    )


def _merge_device(run: RunArguments) -> torch.device:
    """Where adapters merge: the CPU, or with ``--export_device auto`` the run's first chip."""
    if run.export.export_device == "cpu":
        return torch.device("cpu")
    device_type = run.chips.device or default_device_type()
    first = parse_chip_ids(run.chips.chips)[0]
    prepare_device_type(device_type, first + 1)
    return chip_devices(device_type, [first])[0]


def _write_hf(
    folder: Path,
    base: Path,
    adapters: list[Path],
    config: ModelConfig,
    tokenizer: Tokenizer,
    stop_words: tuple[str, ...],
    dtype: torch.dtype,
    run: RunArguments,
    device: torch.device,
    say,
) -> None:
    """The Hugging Face folder: weights, config, generation config, tokenizer."""
    export = run.export
    merging = f"merging {len(adapters)} adapter(s) into" if adapters else "reading"
    say(f"{merging} {base} part by part on {device}, writing {str(dtype).removeprefix('torch.')}")
    files = write_merged(
        base, adapters, folder, dtype, shard_bytes(export.export_size), export.export_legacy_format, device
    )
    say(f"wrote {len(files)} weight file(s)")
    raw = dict(config.raw)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps(_generation_config(base, config, tokenizer, stop_words), indent=2) + "\n"
    )
    tokenizer.save(folder)


def _write_gguf(
    folder: Path,
    name: str,
    base: Path,
    adapters: list[Path],
    config: ModelConfig,
    tokenizer: Tokenizer,
    stop_words: tuple[str, ...],
    quantization: str,
    device: torch.device,
    say,
) -> None:
    """One GGUF file, ``NAME-QUANT.gguf``, streamed from the merged parts."""
    file = folder / f"{name}-{quantization}.gguf"
    merging = f"merging {len(adapters)} adapter(s) into" if adapters else "reading"
    say(f"{merging} {base} part by part on {device}, writing GGUF {quantization}")
    tensors = (item for part in merged_parts(base, adapters, torch.float32, device) for item in part.items())
    write_gguf(
        file,
        config,
        tokenizer,
        tensor_shapes(config),
        tensors,
        quantization,
        name,
        stop_words[0] if stop_words else None,
    )
    say(f"wrote {file.name} ({file.stat().st_size / 2**20:.1f} MiB)")


def _generation_config(base: Path, config: ModelConfig, tokenizer: Tokenizer, stop_words: tuple[str, ...]) -> dict:
    """The base's generation_config.json (if any), its EOS ids the tokenizer's EOS and the stop words."""
    generation = {}
    file = base / "generation_config.json"
    if file.is_file() and file.stat().st_size < 2**20:
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"))
            generation = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            generation = {}
    eos = [tokenizer.eos_token_id, *(tokenizer.token_to_id(word) for word in stop_words)]
    eos = list(dict.fromkeys(i for i in eos if i is not None))
    if eos:
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("pad_token_id", tokenizer.pad_token_id)):
        if value is not None:
            generation[key] = value
    return generation
