"""metrics.png (one panel per metric: every model's value with its 95% interval) and training.png (the
loss curves of the pretraining run and of every fine-tune)."""

from __future__ import annotations

from pathlib import Path

from codetune.atomic import write_file
from codetune.eval.report import bar_heights

from .report import ROWS

COLORS = ["#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]


def _save(fig, path: Path) -> None:
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))


def metrics_png(meas: dict, models: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r.label in meas]
    if not rows:
        return False
    cols = 4
    n_rows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.0 * cols, 3.0 * n_rows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        m = meas[row.label]
        scale = 100.0 if row.metric.kind in ("proportion", "mean") else 1.0
        names = [x for x in models if x in m]
        vals, err = bar_heights(m, names, scale)
        ax.bar(range(len(names)), vals, yerr=err, capsize=3, color=[COLORS[models.index(x) % len(COLORS)] for x in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(row.label + (" (%)" if scale == 100 else ""), fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def training_png(ctx, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from codetune.metrics import read_metrics

    runs = [p for p in sorted(ctx.path("runs").glob("*/metrics.jsonl"))]
    if not runs:
        return False
    fig, (ax_pre, ax_ft) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, p in enumerate(runs):
        name = p.parent.name
        rows = read_metrics(p)
        ax = ax_pre if name == "pretrain" else ax_ft
        color = COLORS[i % len(COLORS)]
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], style, color=color, markersize=3,
                        label=f"{name} {'train' if key == 'loss' else 'val'}", alpha=0.8 if key == "loss" else 1.0)
    for ax, title in ((ax_pre, "pretraining from random init"), (ax_ft, "fine-tuning on the domain")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def write(ctx, meas: dict, models: list[str], folder: Path) -> list[str]:
    made = []
    if metrics_png(meas, models, folder / "metrics.png"):
        made.append("metrics.png")
    if training_png(ctx, folder / "training.png"):
        made.append("training.png")
    return made
