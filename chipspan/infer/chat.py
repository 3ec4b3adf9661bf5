"""A multi-turn chat with one model (optionally with a LoRA adapter), formatted by its own chat template."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch

from chipspan.adapters.peft_io import adapter_folders, check_adapters, load_adapters
from chipspan.data.encode import encode_prompt
from chipspan.data.templates import Template, fix_tokenizer, get_template
from chipspan.devices import prepare_device_type
from chipspan.errors import ChipspanError
from chipspan.infer.generate import SamplingSettings, generate
from chipspan.models.config import ModelConfig
from chipspan.models.decoder import CausalLM
from chipspan.models.tokenizer import Tokenizer
from chipspan.models.weights import load_pretrained


class ChatSession:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        settings: SamplingSettings,
        stop_ids: set[int],
        system: str | None = None,
        template: Template | None = None,
    ):
        """``template``: the training template that encodes prompts (None: the tokenizer's chat template)."""
        self.model, self.tokenizer, self.settings, self.stop_ids = model, tokenizer, settings, stop_ids
        self.template, self.system = template, system or ""
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    @classmethod
    def load(cls, args: argparse.Namespace) -> ChatSession:
        """Config and tokenizer first (cheap, fail fast), then the weights, then the adapter."""
        folder = Path(args.model_name_or_path)
        config = ModelConfig.from_folder(folder)
        tokenizer = Tokenizer.from_folder(folder)
        template = None
        if args.template is not None:
            template = get_template(args.template, args.template_revision, tokenizer=tokenizer)
            fix_tokenizer(tokenizer, template)  # as training did: its stop words, its EOS
        if tokenizer.vocab_size > config.vocab_size:
            raise ChipspanError(
                f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {config.vocab_size}: tokenizer and weights are from different models"
            )
        adapters = adapter_folders(args.adapter_name_or_path)
        check_adapters(config, adapters)
        device_type, _, index = args.device.partition(":")
        if index and not index.isdigit():
            raise ChipspanError(f"cannot read device '{args.device}'; write it like cpu, cuda:1 or emu:0")
        prepare_device_type(device_type, int(index or 0) + 1)
        model = load_pretrained(folder, dtype=getattr(torch, args.dtype), device=args.device)
        load_adapters(model, adapters, keep_last=True)
        settings = SamplingSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
        if template is None and tokenizer.chat_template is None:
            print(
                "chipspan: note: the tokenizer has no chat template; prompts are continued as plain text",
                file=sys.stderr,
            )
        stop_ids = stop_token_ids(folder, model, tokenizer)
        if template is not None:
            stop_ids |= {tokenizer.token_to_id(word) for word in template.stop_words} - {None}
        return cls(model, tokenizer, settings, stop_ids, args.system, template)

    def prompt_ids(self) -> list[int]:
        """The conversation so far, ending where the assistant's next answer starts: with a template,
        the ids training put there (``encode_prompt``)."""
        if self.template is not None:
            turns = [(m["role"], m["content"]) for m in self.messages if m["role"] != "system"]
            return encode_prompt(turns, self.template, self.tokenizer, self.system)
        if self.tokenizer.chat_template is None:
            return self.tokenizer.encode(self.messages[-1]["content"], add_special_tokens=True)
        text = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reply(self, message: str, stream: TextIO | None = None) -> str:
        """Answer ``message``, echoing the answer to ``stream`` as it is generated; keeps the history."""
        self.messages.append({"role": "user", "content": message})
        printed = ""
        new_ids: list[int] = []

        def show(token: int) -> None:
            nonlocal printed
            new_ids.append(token)
            text = self.tokenizer.decode(new_ids)
            if stream is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                stream.write(text[len(printed) :])
                stream.flush()
                printed = text

        generate(self.model, self.prompt_ids(), self.stop_ids, self.settings, on_token=show)
        answer = self.tokenizer.decode(new_ids)
        if stream is not None:
            stream.write(answer[len(printed) :] + "\n")
            stream.flush()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def stop_token_ids(folder: Path, model: CausalLM, tokenizer: Tokenizer) -> set[int]:
    """EOS ids from the tokenizer, config.json and generation_config.json (any may list several)."""
    ids: set[int] = set()
    sources = [tokenizer.eos_token_id, model.config.eos_token_id]
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
