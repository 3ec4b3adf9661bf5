"""One generation engine for `chipspan chat` and `chipspan api`: a model with its adapters merged,
spanned over chips as training spans it, its tokenizer and template, answering conversations.

Prompts are the ids training put before an answer (``encode_prompt``); generation stops at EOS, the
template's stop words and the EOS ids of ``config.json``/``generation_config.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from chipspan import devices
from chipspan.adapters.peft_io import check_adapters, load_adapters, run_adapters
from chipspan.args import RunArguments
from chipspan.chips.job import quant_settings
from chipspan.chips.placement import even_placement
from chipspan.chips.plan import check_chip_count, emulated_chip_memory
from chipspan.chips.span import SpannedModel
from chipspan.data.encode import encode_prompt
from chipspan.data.template_auto import ChatTemplate
from chipspan.data.template_tools import extract_calls, tools_text
from chipspan.data.templates import Template, fix_tokenizer, get_template, run_template
from chipspan.errors import ChipspanError
from chipspan.infer.generate import SamplingSettings, generate, picking_device, sampling_settings
from chipspan.infer.spanned import SpannedDecoder
from chipspan.infer.stream import TextStream
from chipspan.models.config import ModelConfig
from chipspan.models.tokenizer import Tokenizer
from chipspan.precision import choose_precision

USER_SIDE, ASSISTANT_SIDE = ("user", "observation"), ("assistant", "function")


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (a stop id or stop string) or "length" (max_new_tokens)


class _StopString(Exception):
    """Raised from the token callback to end generation at a stop string."""


def check_messages(messages: Sequence[tuple[str, str]]) -> None:
    """ChipspanError unless ``messages`` (role, content) alternate user side (user, observation) and
    assistant side (assistant, function), starting and ending on the user side."""
    if not messages:
        raise ChipspanError("no messages: a conversation needs at least one user message")
    for i, (role, content) in enumerate(messages):
        side = USER_SIDE if i % 2 == 0 else ASSISTANT_SIDE
        if role not in side:
            raise ChipspanError(
                f"message {i + 1} has role '{role}' where {' or '.join(side)} must come: "
                "messages alternate user and assistant, starting and ending with the user"
            )
        if not isinstance(content, str):
            raise ChipspanError(f"message {i + 1}'s content must be text")
    if len(messages) % 2 == 0:
        raise ChipspanError("the last message must come from the user (or a tool), for the assistant to answer")


class Engine:
    """Answers conversations with one model; one generation at a time (callers queue)."""

    def __init__(
        self,
        decoder: SpannedDecoder,
        tokenizer: Tokenizer,
        template: Template | ChatTemplate,
        stop_ids: set[int],
        settings: SamplingSettings,
        seed: int,
        name: str = "model",
    ):
        """``name``: what the model is called to clients (the API's model id)."""
        self.decoder, self.tokenizer, self.template, self.stop_ids = decoder, tokenizer, template, stop_ids
        config = decoder.stages[0].config
        self.settings, self.vocab_rows, self.context = settings, config.vocab_size, config.max_position_embeddings
        self.name = name
        self.generator = torch.Generator(device=picking_device(decoder.devices[-1])).manual_seed(seed)

    @classmethod
    def load(cls, run: RunArguments, dtype: torch.dtype | None = None, report: Callable[[str], None] = print) -> Engine:
        """Everything checked (flags, config, tokenizer, template, adapters, chips), then the
        weights read onto the chips and the adapters merged in order. ``dtype`` None: from
        --fp16/--bf16/--pure_bf16 as training computes on the device, else float32."""
        settings = sampling_settings(run.generating)
        if not run.model.model_name_or_path:
            raise ChipspanError("--model_name_or_path is required")
        folder = Path(run.model.model_name_or_path)
        config = ModelConfig.from_folder(folder)
        tokenizer = Tokenizer.from_folder(folder)
        if tokenizer.vocab_size > config.vocab_size:
            raise ChipspanError(
                f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {config.vocab_size}: tokenizer and weights are from different models"
            )
        template, template_note = chat_template(run, tokenizer)
        fix_tokenizer(tokenizer, template)  # as training did: its stop words, its EOS
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id >= config.vocab_size:
            raise ChipspanError(
                f"template '{template.name}' makes {tokenizer.eos_token} the EOS, which the model's "
                f"{config.vocab_size} embeddings lack: pick the template the model was trained with"
            )
        adapters = run_adapters(run.model.adapter_name_or_path, run.finetuning.finetuning_type)
        quant = quant_settings(run)
        if quant is not None and len(adapters) > 1:
            raise ChipspanError(
                "--quantization_bit runs one adapter over the quantized base; merge the others first "
                "with chipspan export"
            )
        check_adapters(config, adapters)
        placement = _placement(run, config)
        if dtype is None:
            choice = choose_precision(run, placement.devices[0].type)
            if choice.notice():
                report(choice.notice())
            dtype = choice.autocast_dtype or choice.base_dtype
        model = SpannedModel.load(folder, placement, dtype, quant)
        for stage in model.stages:
            load_adapters(stage, adapters, keep_last=quant is not None)
        report(template_note)  # after everything that can fail, so an error stays the only line
        if placement.num_chips > 1:
            report(f"placement over {placement.num_chips} chips: " + "; ".join(placement.describe(config)))
        stops = stop_token_ids(folder, model.last, tokenizer, template)
        return cls(
            SpannedDecoder(model), tokenizer, template, stops, settings, run.training.seed, folder.resolve().name
        )

    def prompt_ids(self, messages: Sequence[tuple[str, str]], system: str | None = None, tools: str = "") -> list[int]:
        """The ids training put before the answer to ``messages`` (checked by :func:`check_messages`);
        ``system`` None or "": the template's default system prompt; ``tools``: the JSON text of the
        tools' schemas, listed as the template lists them."""
        check_messages(messages)
        if tools and isinstance(self.template, Template) and not tools_text(self.template.tool_format, tools):
            raise ChipspanError(
                f"the tools cannot be listed in tool format {self.template.tool_format}: each needs a name and "
                "parameters with properties"
            )
        ids = encode_prompt(list(messages), self.template, self.tokenizer, system or "", tools)
        beyond = [i for i in ids if i >= self.vocab_rows]
        if beyond:
            raise ChipspanError(
                f"the prompt holds the token {self.tokenizer.id_to_token(beyond[0])!r} (id {beyond[0]}), "
                f"beyond the model's {self.vocab_rows} embeddings"
            )
        return ids

    def generate(
        self,
        messages: Sequence[tuple[str, str]],
        system: str | None = None,
        settings: SamplingSettings | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        within_context: bool = False,
        tools: str = "",
    ) -> Completion:
        """Answer ``messages``; ``on_text`` gets the answer's text as it becomes final (whole
        characters, never the start of a ``stop`` string) and may raise to stop. Sampling draws from
        the engine's generator (seeded with --seed once) unless ``settings.seed`` is set.
        ``within_context``: refuse a prompt that fills the model's context (``max_position_embeddings``)
        and end the answer where the context ends, which bounds what a client can make the chips hold;
        otherwise positions past it are computed as transformers computes them. ``tools``: as for
        :meth:`prompt_ids`."""
        settings = settings or self.settings
        prompt = self.prompt_ids(messages, system, tools)
        if within_context:
            if len(prompt) >= self.context:
                raise ChipspanError(
                    f"the conversation is {len(prompt)} tokens, as long as the model's context "
                    f"({self.context} positions) or longer: shorten it"
                )
            settings = replace(settings, max_new_tokens=min(settings.max_new_tokens, self.context - len(prompt)))
        stream = TextStream(self.tokenizer, stop)

        def on_token(token: int) -> None:
            piece = stream.add(token)
            if piece and on_text is not None:
                on_text(piece)
            if stream.stopped:
                raise _StopString

        generator = None if settings.seed is not None else self.generator
        try:
            generate(self.decoder, prompt, self.stop_ids, settings, on_token, generator)
        except _StopString:
            pass
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(rest)
        ended = stream.stopped or len(stream.ids) < settings.max_new_tokens
        return Completion(stream.text, len(prompt), len(stream.ids), "stop" if ended else "length")

    def function_calls(self, answer: str) -> list[tuple[str, str]] | None:
        """The function calls ``answer`` makes in the template's tool format, ``[(name, arguments
        JSON)]``; None for a text answer, or under ``--template auto`` (its calls have no known form)."""
        if isinstance(self.template, ChatTemplate):
            return None
        return extract_calls(self.template.tool_format, answer)

    def with_settings(self, **changes) -> SamplingSettings:
        """The engine's settings with ``changes`` (SamplingSettings fields)."""
        return replace(self.settings, **changes)


def chat_template(run: RunArguments, tokenizer: Tokenizer) -> tuple[Template | ChatTemplate, str]:
    """--template NAME (either revision) or auto; without --template the model's own chat template,
    else LLaMA-Factory 0.9's ``empty`` (plain text), as LLaMA-Factory 0.9 chooses. With the line
    saying which."""
    data = run.data
    if "template" in run.given:
        template = run_template(data, tokenizer)
        revision = "" if isinstance(template, ChatTemplate) else f" ({template.revision})"
        return template, f"note: template {template.name}{revision}: prompts are encoded as training encodes them"
    if tokenizer.chat_template is not None:
        template = get_template("auto", tokenizer=tokenizer, default_system=data.default_system)
        return template, "note: no --template given: prompts use the model's own chat template (--template auto)"
    template = get_template("empty", "lf-0.9", default_system=data.default_system)
    return (
        template,
        "note: no --template given and the tokenizer has no chat template: plain text (template empty, lf-0.9)",
    )


def _placement(run: RunArguments, config: ModelConfig):
    """The chips (--device, --chips or USE_SOPHGO/SOPHGO_SPLIT/CHIPS) with the decoder layers split
    evenly over them; emulated chips started (with --chip_memory as their limit)."""
    device_type, _, index = (run.chips.device or devices.default_device_type()).partition(":")
    if index and not index.isdigit():
        raise ChipspanError(f"cannot read --device '{run.chips.device}'; write it like cpu, cuda, tpu or cuda:1")
    if run.chips.chips == "auto":
        raise ChipspanError("--chips auto sizes a training job; name the chips to span, e.g. --chips 0-1")
    chip_ids = devices.parse_chip_ids(run.chips.chips or index or None)  # --device cuda:1 is chip 1
    check_chip_count(len(chip_ids), config)
    limit = emulated_chip_memory(run, device_type)
    devices.prepare_device_type(device_type, chip_ids[-1] + 1, emu_memory_limit=limit)
    return even_placement(config, devices.chip_devices(device_type, chip_ids))


def stop_token_ids(
    folder: Path, model, tokenizer: Tokenizer, template: Template | ChatTemplate | None = None
) -> set[int]:
    """EOS ids from the tokenizer, ``model.config``, generation_config.json (any may list several)
    and the template's stop words."""
    ids: set[int] = set()
    sources = [tokenizer.eos_token_id, model.config.eos_token_id]
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        try:
            sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
        except (ValueError, AttributeError):
            print(
                f"chipspan: note: {generation_config} is not a JSON object; its EOS ids are not used", file=sys.stderr
            )
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if template is not None:
        ids |= {tokenizer.token_to_id(word) for word in template.stop_words} - {None}
    return ids
