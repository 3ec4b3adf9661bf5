"""The ``chipspan`` command line: one subcommand per job.

    chipspan train [run.yaml] [--flag ...]   fine-tune, spanned over chips
    chipspan plan [--flag ...]               memory per chip, before anything loads
    chipspan data [--flag ...] [--out FILE]  the encoded dataset as JSON lines, masked spans marked
    chipspan convert MODEL.gguf OUT_DIR      GGUF -> Hugging Face folder
    chipspan export [--flag ...]             merge adapters into the base: a Hugging Face folder or GGUF
    chipspan chat --model_name_or_path DIR   talk to a model (and adapters), spanned over chips
    chipspan api --model_name_or_path DIR    serve it behind OpenAI's /v1/chat/completions
    chipspan demo                            a real model, end to end
    chipspan env [--device TYPE] [--json]    versions, chips and memory: send it with a bug report

A ChipspanError is printed as one line (``chipspan: error: ...``) and exits 1; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

import torch

from chipspan.errors import ChipspanError

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chipspan", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="turn a Llama-architecture GGUF into a Hugging Face folder")
    convert.add_argument("gguf", help="the .gguf file")
    convert.add_argument("out_dir", help="folder to create (config.json, model.safetensors, tokenizer)")
    convert.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    convert.add_argument(
        "--tokenizer",
        dest="tokenizer_dir",
        metavar="DIR",
        help="copy the tokenizer from this HF folder instead of rebuilding it from the GGUF",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    convert.set_defaults(run=_run_convert)

    train = commands.add_parser(
        "train", add_help=False, help="fine-tune (LLaMA-Factory's flags; `chipspan train --help` lists them)"
    )
    train.set_defaults(run=_run_train)  # its flags are read by chipspan.args

    plan = commands.add_parser(
        "plan", add_help=False, help="memory per chip for a job, before anything loads (train's flags, --json)"
    )
    plan.set_defaults(run=_run_plan)

    data = commands.add_parser(
        "data",
        add_help=False,
        help="encode the dataset as train would and write it as JSON lines (train's flags, --out FILE)",
    )
    data.set_defaults(run=_run_data)

    export = commands.add_parser(
        "export",
        add_help=False,
        help="merge adapters into the base and write it: Hugging Face folder or GGUF (LLaMA-Factory's export flags)",
    )
    export.set_defaults(run=_run_export)

    chat = commands.add_parser(
        "chat",
        add_help=False,
        help="chat with a model spanned over chips (LLaMA-Factory's inference flags; --prompt TEXT answers once)",
    )
    chat.set_defaults(run=_run_chat)

    api = commands.add_parser(
        "api", add_help=False, help="an OpenAI-compatible HTTP server (chat's flags; API_HOST, API_PORT, API_KEY)"
    )
    api.set_defaults(run=_run_api)

    demo = commands.add_parser("demo", help="fetch a small real model and run the main job end to end")
    demo.add_argument("--cache_dir", help="where fetched models go (default: $CHIPSPAN_CACHE or ~/.cache/chipspan)")
    demo.add_argument("--output_dir", default="demo_out", help="where the adapter and plots go")
    demo.set_defaults(run=_run_demo)

    env = commands.add_parser("env", help="versions, chips and their memory, chip variables: for a bug report")
    env.add_argument("--device", help="the device type to list (default: the accelerator PyTorch reports, else cpu)")
    env.add_argument("--json", action="store_true", help="print JSON")
    env.set_defaults(run=_run_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "plan", "data", "export", "chat", "api"):
        args.flags = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except ChipspanError as exc:
        if args.debug:
            raise
        print(f"chipspan: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever a value holds
        return 1
    except torch.OutOfMemoryError as exc:
        if args.debug:
            raise
        print(
            f"chipspan: error: {str(exc).splitlines()[0]} — span the model over more chips, or lower "
            "per_device_train_batch_size or cutoff_len",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _run_convert(args: argparse.Namespace) -> None:
    from chipspan.models.gguf_import import convert_gguf
    from chipspan.paths import check_output

    check_output(
        args.out_dir, "OUT_DIR", {"the GGUF file": args.gguf, "the tokenizer folder (--tokenizer)": args.tokenizer_dir}
    )
    out = convert_gguf(
        args.gguf, args.out_dir, dtype=args.dtype, tokenizer_dir=args.tokenizer_dir, overwrite=args.overwrite
    )
    print(f"wrote {out}")


def _help_asked(flags: list[str], summary: str = "", command: str = "train") -> bool:
    """Whether -h/--help is among a command's flags; if so, print ``summary`` and ``command``'s flags."""
    if not {"-h", "--help"} & set(flags):
        return False
    from chipspan.args import flags_help

    if summary:
        print(summary + "\n")
    print(flags_help(command))
    return True


def _run_train(args: argparse.Namespace) -> None:
    from chipspan.args import parse_run_arguments
    from chipspan.train.recipe import run_train

    if _help_asked(args.flags):
        return
    run = parse_run_arguments(args.flags)
    from chipspan.chips.job import one_process_per_chip
    from chipspan.distributed import launch

    if launch.wants_processes(run):
        from chipspan.distributed.recipe import run_distributed_train

        run_distributed_train(run)
    elif one_process_per_chip(run):  # --launcher torchrun, not yet under torchrun
        code = launch.relaunch(run, args.flags)
        if code:
            raise SystemExit(code)
    else:
        run_train(run)


def _run_export(args: argparse.Namespace) -> None:
    from chipspan.args import parse_run_arguments
    from chipspan.export.command import run_export

    if _help_asked(args.flags, "chipspan export: LLaMA-Factory's export flags (docs/export.md)", "export"):
        return
    run = parse_run_arguments(args.flags, command="export")
    for notice in run.notices:
        print(notice, file=sys.stderr)
    print(f"wrote {run_export(run)}")


def _run_plan(args: argparse.Namespace) -> None:
    from chipspan.args import parse_run_arguments
    from chipspan.chips.plan import make_plan, render, to_json

    if _help_asked(
        args.flags,
        "chipspan plan: train's flags (the model may be a config.json), --chip_memory 16GiB, "
        "--usable_fraction 0.9, --chips N-M or auto, --json, --suggest (which memory savers make the job fit)",
    ):
        return
    as_json, suggesting = "--json" in args.flags, "--suggest" in args.flags
    run = parse_run_arguments([f for f in args.flags if f not in ("--json", "--suggest")])
    for notice in run.notices:
        print(notice, file=sys.stderr)
    if suggesting:
        from chipspan.chips import suggest

        as_is, kept = suggest.suggest(run)
        print(suggest.to_json(as_is, kept) if as_json else suggest.render(as_is, kept, run.chips.chips == "auto"))
        return
    plan = make_plan(run)
    print(to_json(plan) if as_json else render(plan))


def _run_data(args: argparse.Namespace) -> None:
    from chipspan.args import parse_run_arguments
    from chipspan.data.inspect import run_data
    from chipspan.paths import check_output, run_inputs

    if _help_asked(
        args.flags,
        "chipspan data: train's flags, --out FILE (default: stdout); writes one JSON line "
        "per example (split, input_ids, labels, text with masked spans in « »), counts on "
        "stderr",
    ):
        return
    flags, out = _take_option(args.flags, "--out")
    run = parse_run_arguments(flags)
    if out is not None:
        check_output(out, "--out", run_inputs(run), kind="file")
    if run.data.tokenized_path:
        check_output(run.data.tokenized_path, "--tokenized_path", run_inputs(run))
    run_data(run, out)


def _take_option(flags: list[str], name: str) -> tuple[list[str], str | None]:
    """``flags`` without ``name VALUE`` (or ``name=VALUE``), and that value (None when absent)."""
    rest, value, i = [], None, 0
    while i < len(flags):
        if flags[i] == name:
            if i + 1 == len(flags):
                raise ChipspanError(f"{name} needs a value")
            value, i = flags[i + 1], i + 2
            continue
        if flags[i].startswith(name + "="):
            value = flags[i].split("=", 1)[1]
        else:
            rest.append(flags[i])
        i += 1
    return rest, value


def _run_env(args: argparse.Namespace) -> None:
    from chipspan import env_report

    report = env_report.collect(args.device)
    print(env_report.to_json(report) if args.json else env_report.render(report))


def _run_demo(args: argparse.Namespace) -> None:
    from chipspan.demo import run_demo

    run_demo(args.cache_dir, args.output_dir)


CHAT_SUMMARY = (
    "chipspan {command}: LLaMA-Factory's inference flags and YAML (model_name_or_path, adapter_name_or_path, "
    "template, template_revision, default_system, do_sample, temperature, top_p, top_k, max_new_tokens, "
    "repetition_penalty, --device, --chips; docs/serve.md), and --system TEXT, --dtype float32|bfloat16|float16"
)


def _engine_flags(flags: list[str], command: str):
    """(the engine, the --system text): --system and --dtype are taken out, the rest read as
    train's flags are; the engine loaded with notes on stderr."""
    from chipspan.args import parse_run_arguments
    from chipspan.infer.engine import Engine

    flags, system = _take_option(flags, "--system")
    flags, dtype = _take_option(flags, "--dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ChipspanError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    run = parse_run_arguments(flags, command=command)
    for notice in run.notices:
        print(notice, file=sys.stderr)
    engine = Engine.load(run, getattr(torch, dtype) if dtype else None, lambda line: print(line, file=sys.stderr))
    return engine, system


def _run_chat(args: argparse.Namespace) -> None:
    from chipspan.infer.chat import run_chat

    if _help_asked(args.flags, CHAT_SUMMARY.format(command="chat") + ", --prompt TEXT (answer once, exit)", "chat"):
        return
    flags, prompt = _take_option(args.flags, "--prompt")
    engine, system = _engine_flags(flags, "chat")
    run_chat(engine, prompt, system)


def _run_api(args: argparse.Namespace) -> None:
    from chipspan.infer.api import ServerSettings, serve

    if _help_asked(
        args.flags,
        CHAT_SUMMARY.format(command="api") + "; API_HOST, API_PORT, API_KEY, API_MODEL_NAME, API_QUEUE",
        "api",
    ):
        return
    server = ServerSettings.from_environment()  # checked before the model loads
    engine, system = _engine_flags(args.flags, "api")
    serve(engine, server, system)
