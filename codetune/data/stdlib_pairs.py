"""A small prompt/response set made locally: docstring -> function pairs from Python sources (by
default the standard library), as instruction rows that `codetune prepare` reads. It shows chat
fine-tuning end to end without downloading anything:

    python -m codetune.data.stdlib_pairs runs/pairs.jsonl --limit 2000
    codetune prepare --config configs/tiny.yaml /usr/lib/python3.11 runs/pairs.jsonl --mix code=0.7,chat=0.3

Each pair asks for a function by its signature and docstring; the answer is the function without
its docstring (through ast.unparse: comments go, the code is the same).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from codetune.atomic import write_text
from codetune.config import ConfigError

MIN_DOC_CHARS = 30  # "Return x." tells too little to write a function from


def pairs_from_source(text: str) -> Iterator[dict]:
    """Instruction rows for the documented top-level functions and methods of one module."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < MIN_DOC_CHARS or len(node.body) < 2:
            continue
        body = node.body[1:]  # the docstring is the first statement
        fn = type(node)(name=node.name, args=node.args, body=body, decorator_list=[], returns=node.returns,
                        type_params=getattr(node, "type_params", []))
        code = ast.unparse(ast.fix_missing_locations(fn))
        signature = code.splitlines()[0].rstrip(":")
        yield {"instruction": f"Write the Python function `{signature}`:\n\n{doc}", "input": "", "output": code + "\n"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def build(root: Path, limit: int) -> list[dict]:
    rows: list[dict] = []
    for f in sorted(root.rglob("*.py")):
        if "test" in f.parts or "site-packages" in f.parts:
            continue
        rows += pairs_from_source(f.read_text(encoding="utf-8", errors="replace"))
        if len(rows) >= limit:
            break
    return rows[:limit]


def write_pairs(out: Path, root: Path, limit: int) -> int:
    """Write up to `limit` pairs to `out` (never over an existing file); returns how many."""
    if out.exists():
        raise ConfigError(f"{out} exists; choose a new file name (pairs are never written over a file)")
    if not root.is_dir():
        raise ConfigError(f"--root {root} is not a folder of Python sources")
    rows = build(root, limit)
    if not rows:
        raise ConfigError(f"no documented functions under {root}; point --root at Python sources")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codetune.data.stdlib_pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the JSONL file to write (must not exist)")
    p.add_argument("--root", type=Path, default=stdlib_root(), help="Python sources (default: the standard library)")
    p.add_argument("--limit", type=int, default=2000, help="at most this many pairs (default: 2000)")
    ns = p.parse_args(argv)
    try:
        n = write_pairs(ns.out, ns.root, ns.limit)
    except ConfigError as e:
        print(f"stdlib_pairs: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} docstring -> function pairs to {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
