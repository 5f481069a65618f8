"""`codetune <command>`: flags are generated from the config dataclasses (see config.py, cli_flags.py);
each command's work lives in its stage module and is imported only when that command runs (fast --help).

Every mistake a user can make ends in one line on stderr and exit code 2; anything else is a bug and
says so in one line (exit 1). `--debug` adds the traceback."""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from codetune import __version__, atomic
from codetune.cli_flags import (
    Parser,
    UsageError,
    add_section_flags,
    commands_reading,
    from_args,
    unknown_flag_message,
    with_default,
)
from codetune.config import ConfigError, dump_yaml, sections_for


@dataclass(frozen=True)
class Command:
    target: str  # "module:function" that runs it
    help: str


# The config fields each command reads are declared beside the fields (config.py, `used_by`).
COMMANDS: dict[str, Command] = {
    "prepare": Command("codetune.data.prepare:run",
                       "turn code (folders, git trees, JSONL/Parquet, HF datasets) into clean FIM-ready token shards"),
    "train": Command("codetune.train.recipe:run", "fine-tune with QLoRA / LoRA / freezing on prepared shards (resumable)"),
    "eval": Command("codetune.eval.run:run",
                    "held-out loss, sandboxed HumanEval pass@k, FIM accuracy; --compare base vs tuned"),
    "plan": Command("codetune.plan.planner:run", "will it fit? predict GPU memory and pick settings for your card"),
    "merge": Command("codetune.export.merge:run",
                     "merge a LoRA adapter into the bf16/fp16 base weights and write a HF model directory"),
    "export": Command("codetune.export.gguf_export:run",
                      "export gguf: one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile"),
    "generate": Command("codetune.export.generate:run", "complete a prompt or fill in the middle, streaming tokens"),
    "serve": Command("codetune.serve.app:run", "OpenAI-compatible /v1/completions server (with FIM via suffix)"),
    "demo": Command("codetune.demo:run",
                    "offline end-to-end run on the CPU: prepare stdlib code, train tiny-stablelm, merge, generate"),
}

DEBUG_HELP = "show the full traceback of an error (default: off)"


def _load(target: str):
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="codetune", description=__doc__.splitlines()[0].replace("`", ""))
    p.add_argument("--version", action="version", version=f"codetune {__version__}")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        # SUPPRESS: given after the command it is set; not given, the top-level --debug's value stands
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sections = sections_for(name)
        if sections:
            sp.add_argument("--config", metavar="YAML", help="preset or config file; flags override it; keys "
                                                             "other commands read are skipped (default: none)")
            sp.add_argument("--print-config", action="store_true",
                            help="print the resolved settings this command reads as YAML and exit (default: off)")
        # a stage module may declare flags of its own (paths of one call's inputs/outputs)
        mod = cmd.target.partition(":")[0]
        try:
            extra = getattr(importlib.import_module(mod), "CLI_FLAGS", [])
        except ImportError:
            extra = []
        for names, kwargs in extra:
            sp.add_argument(*names, **with_default(kwargs))
        for section in sections:
            add_section_flags(sp, name, section)
    return p


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, with leftovers explained: a flag of another command, a near miss, or extra sources."""
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        raise UsageError(f"unknown command {argv[0]!r}" + (f"; did you mean {near[0]}?" if near else
                                                           f"; choose one of {', '.join(COMMANDS)}"))
    ns, rest = parser.parse_known_args(argv)
    if not rest:
        return ns
    sub = subparser(parser, ns.command) if ns.command else parser
    flag = next((r for r in rest if r.startswith("-")), None)
    if flag is not None:
        flag = flag.split("=", 1)[0]
        readers = commands_reading(flag, COMMANDS) if ns.command else []
        raise UsageError(unknown_flag_message(ns.command or "", flag, sub, readers))
    positional = [k for k in vars(ns) if k.startswith("positional:")]
    if positional:  # `prepare a --seq-len 512 b`: argparse takes `a` only
        setattr(ns, positional[0], list(getattr(ns, positional[0])) + rest)
        return ns
    raise UsageError(f"unexpected argument {rest[0]!r} (see codetune {ns.command} --help)")


def explain(e: BaseException) -> tuple[str, int] | None:
    """The one line a user sees for an error they can fix, and the exit code; None for a bug."""
    if isinstance(e, ConfigError):
        return str(e), 2
    if isinstance(e, ImportError):
        return (f"cannot start: {e}. A missing package usually means an optional extra: pip install -e '.[gpu]' "
                "(bitsandbytes) or '.[serve]' (fastapi, uvicorn)"), 2
    if isinstance(e, OSError):
        path = e.filename
        if isinstance(e, FileNotFoundError):
            return (f"no such file or directory: {path}; check the path" if path else str(e)), 2
        if isinstance(e, (NotADirectoryError, FileExistsError)) and path and not os.path.isdir(path):
            # a folder was to be made or entered where a file is (--eval-dir a file, or inside one)
            return f"{path} (or a folder above it) is a file, not a folder; give the path of a folder", 2
        if isinstance(e, PermissionError) or e.errno == errno.EACCES:
            return (f"permission denied: {path or e}; choose a folder you can write to (--out-dir, --data-dir, "
                    "--eval-dir) or fix its permissions"), 2
        # a full or read-only disk: the same words as every writer's own check (atomic.write_error)
        err = atomic.write_error(Path(path) if path else Path("."), e,
                                 "write to another folder (--out-dir, --data-dir, --eval-dir)")
        if err is not None:
            return str(err), 2
    return None


def report(command: str, e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(e)
    known = explain(e)
    if known is not None:
        print(f"{command}: {known[0]}", file=sys.stderr)
        return known[1]
    hint = "" if debug else " (run with --debug for the traceback)"
    print(f"{command}: internal error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    # PEFT asks transformers a deprecated question on every model it wraps; the answer is right, the
    # warning is noise to a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parse(parser, argv)
    except UsageError as e:
        command = next((a for a in argv if a in COMMANDS), None)
        return report(f"codetune {command}" if command else "codetune", e, "--debug" in argv)
    if not ns.command:
        parser.print_help()
        return 2
    name, debug = f"codetune {ns.command}", ns.debug
    try:
        cfgs = from_args(ns.command, ns) if sections_for(ns.command) else {}
        if getattr(ns, "print_config", False):
            print(dump_yaml(cfgs, ns.command), end="")
            return 0
        fn = _load(COMMANDS[ns.command].target)
        return int(fn(cfgs, ns) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return report(name, e, debug)


if __name__ == "__main__":
    raise SystemExit(main())
