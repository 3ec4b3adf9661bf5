"""`chipspan chat`: prompts are training's ids, answers equal generating from them directly (with
adapters, over several chips), the interactive loop keeps and clears history, and bad flags get one
line before a weight is read."""

import io
import warnings

import peft
import pytest
import torch
import transformers
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from chipspan import emu
from chipspan.args import parse_run_arguments
from chipspan.cli import main
from chipspan.data.encode import encode_prompt
from chipspan.data.templates import fix_tokenizer, get_template
from chipspan.infer.chat import ChatSession, interact
from chipspan.infer.engine import Engine
from chipspan.infer.generate import penalize_repetition
from chipspan.infer.stream import TextStream
from chipspan.models.tokenizer import Tokenizer

GREEDY = ["--do_sample", "false", "--max_new_tokens", "12"]


def chat(capsys, *flags):
    """(exit code, stdout, stderr) of `chipspan chat` run in this process."""
    code = main(["chat", *map(str, flags)])
    out = capsys.readouterr()
    return code, out.out, out.err


def reference(folder, messages, template_name, system="", adapter=None, revision="lf-0.5", penalty=1.0, tokens=12):
    """transformers' (and PEFT's) greedy answer to training's prompt ids for ``messages``: the text."""
    tokenizer = Tokenizer.from_folder(folder)
    template = get_template(template_name, revision, tokenizer=tokenizer)
    fix_tokenizer(tokenizer, template)
    prompt = encode_prompt(messages, template, tokenizer, system)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter).eval()
    stops = [tokenizer.eos_token_id] + [tokenizer.token_to_id(w) for w in template.stop_words]
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=0,
        repetition_penalty=penalty,
    )[0, len(prompt) :].tolist()
    return tokenizer.decode([t for t in out if t not in stops])


@pytest.mark.parametrize("template", ["default", "llama2"])
def test_prompt_answer_equals_transformers_from_training_ids(tiny_workspace, capsys, template):
    model = tiny_workspace / "model"
    code, out, err = chat(capsys, "--model_name_or_path", model, "--template", template, *GREEDY, "--prompt", "Hello")
    assert code == 0, err
    assert out == reference(model, [("user", "Hello")], template) + "\n"
    assert f"note: template {template} (lf-0.5)" in err


def test_without_template_the_plain_text_template_is_used_and_said(tiny_workspace, capsys):
    model = tiny_workspace / "model"
    code, out, err = chat(capsys, "--model_name_or_path", model, *GREEDY, "--prompt", "Hello")
    assert code == 0, err
    assert out == reference(model, [("user", "Hello")], "empty", revision="lf-0.9") + "\n"
    assert "no --template given and the tokenizer has no chat template" in err


def test_system_prompt_reaches_the_prompt(tiny_workspace, capsys):
    model = tiny_workspace / "model"
    flags = ["--model_name_or_path", model, "--template", "llama2", *GREEDY, "--prompt", "Hello"]
    code, out, _ = chat(capsys, *flags, "--system", "Be brief.")
    assert code == 0 and out == reference(model, [("user", "Hello")], "llama2", "Be brief.") + "\n"


@pytest.fixture(scope="module")
def adapter(tiny_workspace, tmp_path_factory):
    """A PEFT LoRA adapter with random A and B on q_proj and v_proj of tiny_workspace's model."""
    folder = tmp_path_factory.mktemp("adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_workspace / "model")
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.3)
    model.save_pretrained(folder)
    return folder


def test_adapter_answer_equals_peft_base_plus_adapter(tiny_workspace, adapter, capsys):
    model = tiny_workspace / "model"
    flags = ["--model_name_or_path", model, "--adapter_name_or_path", adapter, "--template", "default", *GREEDY]
    code, out, err = chat(capsys, *flags, "--prompt", "Hello")
    assert code == 0, err
    want = reference(model, [("user", "Hello")], "default", adapter=adapter)
    assert out == want + "\n"
    assert want != reference(model, [("user", "Hello")], "default")  # the adapter changes the answer


def test_two_cpu_chips_answer_as_one(tiny_workspace, adapter, capsys):
    flags = ["--model_name_or_path", tiny_workspace / "model", "--adapter_name_or_path", adapter, *GREEDY]
    one = chat(capsys, *flags, "--prompt", "Hello")
    two = chat(capsys, *flags, "--chips", "0-1", "--prompt", "Hello")
    assert one[0] == two[0] == 0 and one[1] == two[1]
    assert "placement over 2 chips: chip 0 (cpu): layers 0-1" in two[2]


def test_two_emulated_chips_answer_as_the_cpu(tiny_workspace, capsys, monkeypatch):
    if not emu.is_available():
        pytest.skip("emulated chips cannot be built here (no C++ compiler)")
    flags = ["--model_name_or_path", tiny_workspace / "model", "--template", "default", *GREEDY, "--prompt", "Hi"]
    cpu = chat(capsys, *flags)
    monkeypatch.setenv("SOPHGO_SPLIT", "2")
    monkeypatch.setenv("CHIPS", "0")
    chips = chat(capsys, *flags, "--device", "emu")
    assert cpu[0] == chips[0] == 0 and cpu[1] == chips[1]
    assert "chip 1 (emu:1): layers 2-3" in chips[2]


def engine_of(tiny_workspace, *flags):
    run = parse_run_arguments(["--model_name_or_path", str(tiny_workspace / "model"), *GREEDY, *flags], {})
    return Engine.load(run, report=lambda _: None)


def test_interactive_session_keeps_history_clears_and_exits(tiny_workspace):
    engine = engine_of(tiny_workspace, "--template", "default")
    stdin = io.StringIO("Hi\nAnd then?\n\nclear\nHi\nexit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    interact(ChatSession(engine), stdin, stdout, stderr)
    first, second, third = stdout.getvalue().splitlines()
    assert first == third  # after clear, the same question in a fresh history
    model = tiny_workspace / "model"
    assert second == reference(model, [("user", "Hi"), ("assistant", first), ("user", "And then?")], "default")
    assert second != reference(model, [("user", "And then?")], "default")  # the history was in the prompt
    assert "history cleared" in stderr.getvalue()


def test_repetition_penalty_is_transformers_processor(tiny_workspace):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    seen = torch.tensor([1, 4, 7, 30, 49])
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[4, 1, 7, 30, 49, 4]]), logits[None].clone())[0]
    assert torch.equal(penalize_repetition(logits, seen, 1.7), want)
    model = tiny_workspace / "model"
    engine = engine_of(tiny_workspace, "--template", "default", "--repetition_penalty", "0.2")
    answer = engine.generate([("user", "Hello")]).text
    assert answer == reference(model, [("user", "Hello")], "default", penalty=0.2)
    assert answer != reference(model, [("user", "Hello")], "default")


def test_sampling_follows_the_seed(tiny_workspace):
    """One generator seeded with --seed per engine: a session repeats; a settings seed repeats alone."""
    hot = ["--template", "default", "--do_sample", "true", "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0"]
    first, again = engine_of(tiny_workspace, *hot, "--seed", "5"), engine_of(tiny_workspace, *hot, "--seed", "5")
    answers = [first.generate([("user", "Hi")]).text for _ in range(2)]
    assert answers == [again.generate([("user", "Hi")]).text for _ in range(2)] and answers[0] != answers[1]
    seeded = first.with_settings(seed=9)
    assert first.generate([("user", "Hi")], settings=seeded) == first.generate([("user", "Hi")], settings=seeded)


def test_stream_gives_whole_characters_and_holds_back_stop_strings(tiny_workspace):
    tokenizer = Tokenizer.from_folder(tiny_workspace / "model")
    text = "你好吗 😀 done. END here"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)
    stopping = TextStream(tokenizer, ["END", "xyz"])
    shown = ""
    for i in ids:
        shown += stopping.add(i)
        assert not shown.endswith(" EN"), "text that may start a stop string was shown"
        if stopping.stopped:
            break
    assert stopping.stopped and shown + stopping.finish() == tokenizer.decode(ids).split("END")[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--top_p", "0"], "--top_p 0.0: must be a finite number in (0, 1]"),
        (["--temperature", "nan"], "--temperature nan: must be a finite number > 0"),
        (["--max_new_tokens", "0"], "--max_new_tokens 0: must be a whole number >= 1"),
        (["--seed", "-1"], "--seed -1: must be a whole number in [0, 4294967295]"),
        (["--num_beams", "2"], "--num_beams 2: beam search is not supported"),
        (["--dtype", "float8"], "--dtype float8 is not one of float32, bfloat16, float16"),
        (["--chips", "auto"], "--chips auto sizes a training job"),
        (["--chips", "0-7"], "8 chips asked for"),
        (["--template", "llama9"], "unknown template 'llama9'"),
        (["--tempreature", "1"], "unknown flag --tempreature (did you mean --temperature?)"),
        (["--finetuning_type", "full", "--adapter_name_or_path", "x"], "--adapter_name_or_path is for LoRA"),
    ],
)
def test_bad_flags_get_one_line_before_weights_load(tiny_workspace, capsys, no_weight_loading, flags, message):
    code, out, err = chat(capsys, "--model_name_or_path", tiny_workspace / "model", *flags, "--prompt", "hi")
    errors = [line for line in err.splitlines() if not line.startswith("note: ")]
    assert code == 1 and out == "" and len(errors) == 1 and errors[0].startswith("chipspan: error: "), err
    assert message in errors[0]
