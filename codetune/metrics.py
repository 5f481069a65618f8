"""Where training numbers go: metrics.jsonl (one line per logged step, the source of truth — resume
truncates it to the checkpoint, so each row is written once), TensorBoard event files, and a PNG of the loss curves at the end."""

from __future__ import annotations

import json
from pathlib import Path

from codetune.atomic import write_text


class MetricsLog:
    """Appends rows to metrics.jsonl. A run resumed from step k keeps the rows up to k (`kept`) and drops
    the later ones, which the resumed run writes again: every step's row is written once."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int = 0, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.kept: list[dict] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops the events a killed session wrote past the checkpoint
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                self.tb = None

    def last(self, key: str, step: int | None = None):
        """The latest kept value of `key` (at `step`, if given), or None."""
        for r in reversed(self.kept):
            if key in r and (step is None or r["step"] == step):
                return r[key]
        return None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A line a killed run left half-written is skipped, not fatal: resume
    and the eval report both read files that SIGKILL may have cut."""
    rows = []
    for ln in Path(path).read_text().splitlines():
        try:
            r = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "step" in r:
            rows.append(r)
    return rows


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    rows = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience; metrics.jsonl holds the numbers
        return None

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
