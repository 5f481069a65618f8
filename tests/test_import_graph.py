"""Which stage package may import which (every import, module-level or inside a function): a stage reads the
outputs of the stages before it and nothing of those after it or beside it. Shared pieces live where both
sides can import them: codetune/model/ (the loss, the adapter directory format), top-level modules
(metrics.py, atomic.py, registry.py). Once train imported export's adapter writer, and eval and plan imported
train's loss and metrics."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "codetune"
STAGES = ("data", "train", "plan", "eval", "export", "serve")
# stage -> the stages it may import. train: data's shards; its start-up memory line is the planner's.
# eval: data's shards. export: data's chat rendering. serve: export's decoding, data's chat roles.
ALLOWED = {"data": set(), "plan": set(), "train": {"data", "plan"}, "eval": {"data"}, "export": {"data"},
           "serve": {"data", "export"}, "model": set()}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "codetune" and len(parts) > 1:
                yield parts[1]


def test_stage_packages_import_only_the_stages_before_them():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for f in sorted((PKG / pkg).rglob("*.py")):
            for target in set(_imports(f)):
                if target in STAGES and target != pkg and target not in allowed:
                    bad.append(f"{f.relative_to(PKG.parent)} imports codetune.{target}")
    assert not bad, bad


def test_the_allowed_graph_has_no_cycle():
    seen, done = set(), set()

    def visit(n):
        assert n not in seen or n in done, f"cycle through {n}"
        if n in done:
            return
        seen.add(n)
        for m in ALLOWED.get(n, ()):
            visit(m)
        done.add(n)

    for n in ALLOWED:
        visit(n)
