"""report.md for `codetune eval --compare`: one table of every metric for base and base + adapter, with
the change and whether it is an improvement, plus PNG charts (per-metric bars; the training run's loss
curves when its metrics file is found). Files are written to temporary names and renamed into place."""

from __future__ import annotations

import math
from pathlib import Path

from codetune.atomic import write_file, write_text
from codetune.train.metrics import read_metrics

PUBLISHED_PASS1 = 0.324  # stable-code-3b's published HumanEval (Python) pass@1

# (path into the results, label, higher is better)
METRICS = [
    (("loss", "loss"), "val loss (nats/token)", False),
    (("loss", "perplexity"), "val perplexity", False),
    (("humaneval", "greedy", "pass@1"), "HumanEval pass@1 (greedy)", True),
    (("humaneval", "sampled", "pass@1"), "HumanEval pass@1 (sampled)", True),
    (("humaneval", "sampled", "pass@10"), "HumanEval pass@10", True),
    (("humaneval", "sampled", "pass@100"), "HumanEval pass@100", True),
    (("fim", "single_line", "exact_match"), "FIM single-line exact match", True),
    (("fim", "single_line", "edit_similarity"), "FIM single-line edit similarity", True),
    (("fim", "multi_line", "exact_match"), "FIM multi-line exact match", True),
    (("fim", "multi_line", "edit_similarity"), "FIM multi-line edit similarity", True),
]


def flatten(results: dict) -> dict[str, float]:
    out = {}
    for path, label, _ in METRICS:
        v = results
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[label] = float(v)
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if abs(v) >= 10 else f"{v:.4f}"


def table(by_model: dict[str, dict]) -> str:
    names = list(by_model)
    flat = {n: flatten(r) for n, r in by_model.items()}
    head = "| metric | " + " | ".join(names) + (" | change | verdict |" if len(names) == 2 else " |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for _, label, higher in METRICS:
        vals = [flat[n].get(label) for n in names]
        if all(v is None for v in vals):
            continue
        row = f"| {label} | " + " | ".join(_fmt(v) for v in vals)
        if len(names) == 2:
            a, b = vals
            if a is None or b is None:
                row += " | — | — |"
            else:
                d = b - a
                better = d > 0 if higher else d < 0
                verdict = "same" if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else (
                    "better" if better else "**worse**")
                row += f" | {d:+.4f} | {verdict} |"
        else:
            row += " |"
        rows.append(row)
    return "\n".join(rows)


def _save(fig, path: Path) -> None:
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def bar_chart(by_model: dict[str, dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = {n: flatten(r) for n, r in by_model.items()}
    labels = [lab for _, lab, _ in METRICS if any(lab in f for f in flat.values())]
    if not labels:
        return False
    cols = min(3, len(labels))
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = ["#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c"]
    for ax, lab in zip(axes.flat, labels):
        names = list(flat)
        vals = [flat[n].get(lab, float("nan")) for n in names]
        ax.bar(names, vals, color=colors[:len(names)])
        ax.set_title(lab, fontsize=9)
        for x, v in enumerate(vals):
            if not math.isnan(v):
                ax.annotate(_fmt(v), (x, v), ha="center", va="bottom", fontsize=8)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def loss_chart(metrics_path: Path, path: Path) -> bool:
    """Every numeric '*loss*' series of the training metrics against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    keys = sorted({k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))})
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o" if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training run")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(out_dir: Path, by_model: dict[str, dict], train_metrics: Path | None = None,
                 notes: list[str] | None = None) -> Path:
    out_dir = Path(out_dir)
    parts = ["# codetune eval report", "", table(by_model), ""]
    if bar_chart(by_model, out_dir / "metrics.png"):
        parts += ["![metrics](metrics.png)", ""]
    if train_metrics is not None and Path(train_metrics).exists() and loss_chart(train_metrics, out_dir / "loss_curves.png"):
        parts += [f"Training loss curves from `{train_metrics}`:", "", "![loss curves](loss_curves.png)", ""]
    parts += [f"Reference: stable-code-3b's published HumanEval (Python) pass@1 is {PUBLISHED_PASS1:.1%}.", ""]
    sandbox = next((r["humaneval"]["sandbox"] for r in by_model.values() if "sandbox" in r.get("humaneval", {})), None)
    if sandbox:
        parts += ["Execution sandbox on this run (see docs/sandbox.md): "
                  f"network namespace {'on' if sandbox['network_namespace'] else 'OFF'}, "
                  f"PID namespace {'on' if sandbox['pid_namespace'] else 'OFF'}, "
                  f"private /tmp {'on' if sandbox.get('private_tmp') else 'OFF'}, "
                  f"unprivileged uid {sandbox['uid'] if sandbox['uid'] is not None else 'no'}, "
                  f"RLIMIT_NPROC binding {'yes' if sandbox['nproc_limit_binds'] else 'NO'}, "
                  f"interpreter `{sandbox['python']}`.", ""]
        parts += [f"- {n}" for n in sandbox.get("notes", [])] + ([""] if sandbox.get("notes") else [])
    parts += notes or []
    path = out_dir / "report.md"
    write_text(path, "\n".join(parts) + "\n")
    return path
