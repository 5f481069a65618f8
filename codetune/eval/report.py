"""report.md for `codetune eval`: one table of every metric that was measured — n, each model's value
with its 95% interval, and with --compare the paired change with its interval and a verdict that is
"better" or "worse" only when the interval excludes zero (codetune/eval/stats.py says which interval is
used where) — plus PNG charts (per-metric bars with the intervals; the training run's loss curves when
its metrics file is found). A suite that did not run has no row and no chart. Files are written to
temporary names and renamed into place."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codetune.atomic import write_file, write_text
from codetune.eval import fim, humaneval, stats
from codetune.eval.passk import pass_at_k
from codetune.metrics import read_metrics

PUBLISHED_PASS1 = 0.324  # stable-code-3b's published HumanEval (Python) pass@1


@dataclass(frozen=True)
class Metric:
    label: str
    path: tuple[str, ...]  # where the aggregate sits in a model's results
    kind: str              # "proportion" (pass/fail items), "mean" (0..1 per item), "loss" (nats/token), "perplexity"
    higher_is_better: bool
    unit: str              # what n counts


METRICS = [
    Metric("val loss (nats/token)", ("loss", "loss"), "loss", False, "sequences"),
    Metric("val perplexity", ("loss", "perplexity"), "perplexity", False, "sequences"),
    Metric("HumanEval pass@1 (greedy)", ("humaneval", "greedy", "pass@1"), "proportion", True, "problems"),
    Metric("HumanEval pass@1 (sampled)", ("humaneval", "sampled", "pass@1"), "mean", True, "problems"),
    Metric("HumanEval pass@10", ("humaneval", "sampled", "pass@10"), "mean", True, "problems"),
    Metric("HumanEval pass@100", ("humaneval", "sampled", "pass@100"), "mean", True, "problems"),
    Metric("FIM single-line exact match", ("fim", "single_line", "exact_match"), "proportion", True, "tasks"),
    Metric("FIM single-line edit similarity", ("fim", "single_line", "edit_similarity"), "mean", True, "tasks"),
    Metric("FIM multi-line exact match", ("fim", "multi_line", "exact_match"), "proportion", True, "tasks"),
    Metric("FIM multi-line edit similarity", ("fim", "multi_line", "edit_similarity"), "mean", True, "tasks"),
    # teacher-forced (eval/fim_loss.py): the reference middle's loss, and how much the suffix lowers it
    Metric("FIM single-line middle loss (nats/token)", ("fim", "single_line", "middle_loss"), "loss", False, "tasks"),
    Metric("FIM single-line suffix gain (nats/token)", ("fim", "single_line", "suffix_gain"), "loss", True, "tasks"),
    Metric("FIM multi-line middle loss (nats/token)", ("fim", "multi_line", "middle_loss"), "loss", False, "tasks"),
    Metric("FIM multi-line suffix gain (nats/token)", ("fim", "multi_line", "suffix_gain"), "loss", True, "tasks"),
]


@dataclass(frozen=True)
class ItemField:
    """fim.jsonl's per-task field behind a FIM aggregate, and the field weighting it (None: every task alike)."""
    value: str
    weight: str | None = None


FIM_ITEM_FIELDS = {"exact_match": ItemField("exact"), "edit_similarity": ItemField("edit_similarity"),
                   # token-weighted, as fim_loss.summarise averages them
                   "middle_loss": ItemField("middle_nats", "middle_tokens"),
                   "suffix_gain": ItemField("suffix_gain", "middle_tokens")}


COUNT_KEY = {"loss": "sequences", "humaneval": "problems", "fim": "tasks"}  # n beside each suite's aggregate


@dataclass(frozen=True)
class Items:
    """One model's per-item values of a metric, keyed so two models' items can be paired."""
    keys: tuple
    values: np.ndarray
    weights: np.ndarray | None = None  # target tokens per sequence (val loss) or per middle (FIM loss)


@dataclass(frozen=True)
class Measurement:
    value: float
    n: int | None
    interval: stats.Interval | None
    items: Items | None


def aggregate(results: dict, path: tuple[str, ...]) -> float | None:
    v = results
    for key in path:
        v = v.get(key) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_items(metric: Metric, results: dict, item_dir: Path | None) -> Items | None:
    """Per-item values from the files `codetune eval` wrote beside results (per-sequence losses sit in
    the results themselves)."""
    suite = metric.path[0]
    if suite == "loss":
        seq = results.get("loss", {}).get("per_sequence") or {}
        nats, toks = np.asarray(seq.get("nats", []), float), np.asarray(seq.get("tokens", []), float)
        if not len(nats) or len(nats) != len(toks) or toks.sum() == 0:
            return None
        return Items(tuple(range(len(nats))), nats / np.maximum(toks, 1), toks)
    if item_dir is None:
        return None
    if suite == "humaneval":
        mode = metric.path[1]
        rows = _jsonl(humaneval.items_file(item_dir, mode))
        k = int(metric.path[2].split("@")[1])
        if not rows or any(r["n"] < k for r in rows):
            return None
        vals = [float(r["passed"] > 0) if mode == "greedy" else pass_at_k(r["n"], r["passed"], k) for r in rows]
        return Items(tuple(r["task_id"] for r in rows), np.asarray(vals))
    return _fim_items(metric, item_dir)


def _fim_items(metric: Metric, item_dir: Path) -> Items | None:
    """Tasks are made deterministically, so both models see them in the same order; rows written before a
    field existed (an older eval) give no items for it."""
    rows = [r for r in _jsonl(item_dir / fim.ITEMS_FILE) if r.get("kind") == metric.path[1]]
    f = FIM_ITEM_FIELDS[metric.path[2]]
    if not rows or any(f.value not in r or (f.weight and f.weight not in r) for r in rows):
        return None
    keys = tuple(f"{i}:{r.get('name')}" for i, r in enumerate(rows))
    weights = np.asarray([float(r[f.weight]) for r in rows]) if f.weight else None
    return Items(keys, np.asarray([float(r[f.value]) for r in rows]), weights)


def _items_mean(items: Items) -> float:
    w = np.ones_like(items.values) if items.weights is None else items.weights
    return float((items.values * w).sum() / w.sum())


def measure(metric: Metric, results: dict, item_dir: Path | None) -> Measurement | None:
    value = aggregate(results, metric.path)
    if value is None:
        return None
    items = read_items(metric, results, item_dir)
    if items is not None:  # files left from another run would disagree with the results: not ours
        expect = math.log(value) if metric.kind == "perplexity" and value > 0 else value
        if not math.isclose(_items_mean(items), expect, rel_tol=1e-6, abs_tol=1e-9):
            items = None
    if items is None:  # the aggregate alone: n from the results, and Wilson where that is enough
        n = aggregate(results, metric.path[:-1] + (COUNT_KEY[metric.path[0]],))
        n = int(n) if n else None
        iv = stats.wilson(int(round(value * n)), n) if n and metric.kind == "proportion" else None
        return Measurement(value, n, iv, None)
    n = len(items.values)
    if metric.kind == "proportion":
        iv = stats.wilson(int(round(items.values.sum())), n)
    else:
        iv = stats.bootstrap_mean(items.values, items.weights)
        if metric.kind == "perplexity":
            iv = stats.Interval(value, math.exp(min(iv.low, 50)), math.exp(min(iv.high, 50)))
    return Measurement(value, n, iv, items)


def paired_change(metric: Metric, base: Measurement, tuned: Measurement) -> stats.Interval | None:
    """tuned - base over the same items (for perplexity: the ratio tuned / base), or None if unpaired."""
    a, b = base.items, tuned.items
    if a is None or b is None or a.keys != b.keys:
        return None
    if metric.kind == "proportion":
        return stats.paired_proportion_difference(list(a.values > 0.5), list(b.values > 0.5))
    d = stats.paired_bootstrap_difference(a.values, b.values, a.weights)
    if metric.kind == "perplexity":  # exp is monotone: the ratio's interval excludes 1 iff Δloss's excludes 0
        return stats.Interval(math.exp(d.estimate), math.exp(d.low), math.exp(d.high))
    return d


def fmt_value(kind: str, v: float) -> str:
    if kind in ("proportion", "mean"):
        return f"{100 * v:.1f}%"
    return f"{v:.3f}" if kind == "loss" else f"{v:.2f}"


def fmt_measurement(metric: Metric, m: Measurement | None) -> str:
    if m is None:
        return "—"
    text = fmt_value(metric.kind, m.value)
    if m.interval is not None:
        text += f" [{fmt_value(metric.kind, m.interval.low)}, {fmt_value(metric.kind, m.interval.high)}]"
    return text


def fmt_change(metric: Metric, c: stats.Interval) -> str:
    if metric.kind in ("proportion", "mean"):
        return f"{100 * c.estimate:+.1f} pp [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"
    if metric.kind == "loss":
        return f"{c.estimate:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"
    return f"×{c.estimate:.3f} [×{c.low:.3f}, ×{c.high:.3f}]"


def _verdict(metric: Metric, c: stats.Interval) -> str:
    if metric.kind == "perplexity":  # a ratio: compare with 1
        c = stats.Interval(c.estimate - 1, c.low - 1, c.high - 1)
    return stats.verdict(c, metric.higher_is_better)


def default_item_dirs(out_dir: Path, names) -> dict[str, Path]:
    """Where `codetune eval` puts per-model files: <eval-dir>/<model>/ with --compare, else the folder."""
    return {n: out_dir / n if (out_dir / n).is_dir() else out_dir for n in names}


def measurements(by_model: dict[str, dict], item_dirs: dict[str, Path] | None) -> dict[str, dict[str, Measurement]]:
    """label -> model -> Measurement, for the metrics at least one model has (in METRICS order)."""
    dirs = item_dirs or {}
    out: dict[str, dict[str, Measurement]] = {}
    for metric in METRICS:
        row = {n: m for n, r in by_model.items() if (m := measure(metric, r, dirs.get(n))) is not None}
        if row:
            out[metric.label] = row
    return out


def _n_cell(metric: Metric, row: dict[str, Measurement]) -> str:
    ns = sorted({m.n for m in row.values() if m.n is not None})
    return "/".join(f"{n:,}" for n in ns) + f" {metric.unit}" if ns else "—"


def table(by_model: dict[str, dict], item_dirs: dict[str, Path] | None = None) -> str:
    names = list(by_model)
    compare = len(names) == 2
    meas = measurements(by_model, item_dirs)
    if not meas:
        return "No suite produced a metric."
    head = "| metric | n | " + " | ".join(f"{n} [95% CI]" for n in names)
    head += " | change [95% CI] | verdict |" if compare else " |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    by_label = {m.label: m for m in METRICS}
    for label, row in meas.items():
        metric = by_label[label]
        line = f"| {label} | {_n_cell(metric, row)} | " + " | ".join(fmt_measurement(metric, row.get(n)) for n in names)
        if compare:
            base, tuned = row.get(names[0]), row.get(names[1])
            change = paired_change(metric, base, tuned) if base and tuned else None
            if change is None:
                line += " | — | not tested (no paired per-item results) |"
            else:
                line += f" | {fmt_change(metric, change)} | {_verdict(metric, change)} |"
        else:
            line += " |"
        rows.append(line)
    return "\n".join(rows)


METHOD_NOTE = ("95% intervals: Wilson for pass/fail proportions, a bootstrap over items "
               f"({stats.BOOTSTRAP_RESAMPLES:,} resamples) for means and the loss. Changes are paired over the "
               "same problems, tasks or sequences (Newcombe's interval for pass/fail, a paired bootstrap "
               "otherwise); a change is called better or **worse** only when its interval excludes zero.")


def _save(fig, path: Path) -> None:
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def bar_heights(row: dict, names: list[str], scale: float) -> tuple[list[float], list[list[float]]]:
    """Bar heights and matplotlib's yerr (below, above) for measures `row[name]` with optional 95%
    intervals, times `scale`: the one way every chart here (and bench/quality's) draws a value and its interval."""
    vals = [row[n].value * scale for n in names]
    err = [[(row[n].value - row[n].interval.low) * scale if row[n].interval else 0 for n in names],
           [(row[n].interval.high - row[n].value) * scale if row[n].interval else 0 for n in names]]
    return vals, err


def bar_chart(by_model: dict[str, dict], path: Path, item_dirs: dict[str, Path] | None = None) -> bool:
    """One panel per measured metric (none for a suite that did not run), bars with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = measurements(by_model, item_dirs)
    if not meas:
        return False
    by_label = {m.label: m for m in METRICS}
    cols = min(3, len(meas))
    rows = (len(meas) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = ["#8c8c8c", "#1f77b4", "#ff7f0e", "#2ca02c"]
    for ax, (label, row) in zip(axes.flat, meas.items()):
        metric = by_label[label]
        scale = 100.0 if metric.kind in ("proportion", "mean") else 1.0
        names = list(row)
        vals, err = bar_heights(row, names, scale)
        ax.bar(names, vals, yerr=err, capsize=4, color=colors[:len(names)])
        ax.set_title(label + (" (%)" if scale == 100 else ""), fontsize=9)
        for x, n in enumerate(names):
            ax.annotate(fmt_value(metric.kind, row[n].value), (x, vals[x]), ha="center", va="bottom", fontsize=8)
    for ax in list(axes.flat)[len(meas):]:
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
                 notes: list[str] | None = None, item_dirs: dict[str, Path] | None = None) -> Path:
    out_dir = Path(out_dir)
    dirs = item_dirs if item_dirs is not None else default_item_dirs(out_dir, by_model)
    parts = ["# codetune eval report", "", table(by_model, dirs), "", METHOD_NOTE, ""]
    if bar_chart(by_model, out_dir / "metrics.png", dirs):
        parts += ["![metrics](metrics.png)", ""]
    if train_metrics is not None and Path(train_metrics).exists() and loss_chart(train_metrics, out_dir / "loss_curves.png"):
        parts += [f"Training loss curves from `{train_metrics}`:", "", "![loss curves](loss_curves.png)", ""]
    if any("humaneval" in r for r in by_model.values()):
        parts += [f"Reference: stable-code-3b's published HumanEval (Python) pass@1 is {100 * PUBLISHED_PASS1:.1f}%.", ""]
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
