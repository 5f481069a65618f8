"""`codetune <command>`: flags are generated from the config dataclasses (see config.py); each command's
work lives in its stage module and is imported only when that command runs (fast --help)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from codetune import __version__
from codetune.config import ConfigError, add_section_flags, from_args

# command -> (config sections it reads, "module:function" that runs it, one-line help)
COMMANDS: dict[str, tuple[list[str], str, str]] = {
    "prepare": (["model", "data"], "codetune.data.prepare:run",
                "turn code (folders, git trees, JSONL/Parquet, HF datasets) into clean FIM-ready token shards"),
    "train": (["model", "adapter", "data", "train"], "codetune.train.recipe:run",
              "fine-tune with QLoRA / LoRA / freezing on prepared shards (resumable)"),
    "eval": (["model", "data", "eval"], "codetune.eval.run:run",
             "held-out loss, sandboxed HumanEval pass@k, FIM accuracy; --compare base vs tuned"),
    "plan": (["model", "adapter", "data", "train"], "codetune.plan.planner:run",
             "will it fit? predict GPU memory and pick settings for your card"),
    "merge": (["model"], "codetune.export.merge:run",
              "merge a LoRA adapter into the bf16/fp16 base weights and write a HF model directory"),
    "generate": (["model"], "codetune.export.generate:run",
                 "complete a prompt or fill in the middle, streaming tokens"),
    "serve": (["model"], "codetune.serve.app:run",
              "OpenAI-compatible /v1/completions server (with FIM via suffix)"),
    "demo": ([], "codetune.demo:run",
             "offline end-to-end run on the CPU: prepare stdlib code, train tiny-stablelm, merge, generate"),
}

# Extra per-command flags that are not config fields (paths of inputs and outputs of one call).
EXTRA: dict[str, list[tuple[tuple, dict]]] = {}


def register_extra(command: str, *names, **kwargs) -> None:
    EXTRA.setdefault(command, []).append((names, kwargs))


def _load(target: str):
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codetune", description=__doc__.splitlines()[0].replace("`", ""),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"codetune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (sections, target, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if sections:
            sp.add_argument("--config", metavar="YAML", help="preset or config file (flags override it)")
        # a stage module may declare flags of its own (paths of one call's inputs/outputs)
        mod = target.partition(":")[0]
        try:
            extra = getattr(importlib.import_module(mod), "CLI_FLAGS", [])
        except ImportError:
            extra = []
        for names, kwargs in list(extra) + EXTRA.get(name, []):
            sp.add_argument(*names, **kwargs)
        for section in sections:
            add_section_flags(sp, section)
    return p


def main(argv: list[str] | None = None) -> int:
    # PEFT asks transformers a deprecated question on every model it wraps; the answer is right, the
    # warning is noise to a user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help()
        return 2
    sections, target, _ = COMMANDS[ns.command]
    try:
        cfgs = from_args(sections, ns) if sections else {}
        fn = _load(target)
    except ConfigError as e:
        print(f"codetune {ns.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except (ImportError, AttributeError) as e:
        print(f"codetune {ns.command}: cannot start ({type(e).__name__}: {e}). A missing package usually means an "
              "optional extra: pip install -e '.[gpu]' (bitsandbytes) or '.[serve]' (fastapi, uvicorn).", file=sys.stderr)
        return 2
    try:
        return int(fn(cfgs, ns) or 0)
    except ConfigError as e:
        print(f"codetune {ns.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"codetune {ns.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
