"""results.json, results.md and the plots: every metric of every model with its 95% interval, each
fine-tune's paired change against the base and against the reference variant, and the issue's four
expectations judged by the rules written in docs/quality.md.

Values, intervals and paired changes are codetune's own (codetune.eval.report.measure / paired_change,
codetune.eval.stats): Wilson for pass/fail rates, a bootstrap over items for means and the loss,
Newcombe's interval or a paired bootstrap for changes on the same items.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from codetune.eval import report as ev
from codetune.eval import stats

from .scale import REFERENCE, VARIANTS

_BY_LABEL = {m.label: m for m in ev.METRICS}


@dataclass(frozen=True)
class Row:
    label: str
    where: str         # the eval folder: domain, general (codetune eval), exec-domain, exec-general
    metric: ev.Metric  # codetune's: where the value sits, its kind, which direction is better


# every FIM row, per held-out set and kind: generation's two, and the teacher-forced two (eval/fim_loss.py)
FIM_WHATS = ("exact match", "edit similarity", "middle loss (nats/token)", "suffix gain (nats/token)")


def _rows() -> list[Row]:
    rows = [Row(f"{s} val loss (nats/token)", s, _BY_LABEL["val loss (nats/token)"]) for s in ("domain", "general")]
    for s in ("domain", "general"):
        for kind in ("single-line", "multi-line"):
            for what in FIM_WHATS:
                rows.append(Row(f"{s} FIM {kind} {what}", s, _BY_LABEL[f"FIM {kind} {what}"]))
    rows += [Row(f"{s} execution pass@1", f"exec-{s}", _BY_LABEL["HumanEval pass@1 (greedy)"]) for s in ("domain", "general")]
    return rows


ROWS = _rows()
FIM_ROWS = [r for r in ROWS if "FIM" in r.label]
GAIN_ROWS = [r for r in FIM_ROWS if r.metric.path[-1] == "suffix_gain"]  # what expectation 3 is judged on


def load_results(folder: Path) -> dict | None:
    """One model's results in one eval folder (codetune eval's file holds them under "models")."""
    p = folder / "results.json"
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    return next(iter(data["models"].values())) if "models" in data else data


def measurements(ctx, models: list[str]) -> dict[str, dict[str, ev.Measurement]]:
    """row label -> model -> Measurement (rows or models without results are left out)."""
    from .pipeline import eval_dir

    out: dict[str, dict[str, ev.Measurement]] = {}
    for row in ROWS:
        for m in models:
            folder = eval_dir(ctx, m, row.where)
            res = load_results(folder)
            meas = ev.measure(row.metric, res, folder) if res is not None else None
            if meas is not None:
                out.setdefault(row.label, {})[m] = meas
    return out


def change(row: Row, meas: dict[str, ev.Measurement], model: str, against: str) -> dict | None:
    if model not in meas or against not in meas:
        return None
    c = ev.paired_change(row.metric, meas[against], meas[model])
    if c is None:
        return None
    return {"label": row.label, "model": model, "against": against, "estimate": c.estimate, "low": c.low,
            "high": c.high, "verdict": stats.verdict(c, row.metric.higher_is_better),
            "text": ev.fmt_change(row.metric, c)}


def changes(meas: dict, models: list[str]) -> list[dict]:
    out = []
    for row in ROWS:
        m = meas.get(row.label, {})
        for model in models[1:]:
            for against in ("base", REFERENCE):
                if model != against:
                    c = change(row, m, model, against)
                    if c is not None:
                        out.append(c)
    return out


def _find(chs: list[dict], label: str, model: str, against: str) -> dict | None:
    return next((c for c in chs if c["label"] == label and c["model"] == model and c["against"] == against), None)


def base_uses_suffix(meas: dict) -> tuple[bool, str]:
    """Whether the base model has FIM ability to keep or lose: its suffix gain (the middle's loss without the
    suffix - with it) has its interval above 0 on at least one held-out set, i.e. it reads the suffix. Exact
    match cannot say so for a small model (session 9's base: 0-1%, docs/quality.md); a model that ignores
    the suffix has nothing for its fine-tunes to keep, and "FIM survives only with FIM data" cannot be told."""
    seen = {r: meas[r.label]["base"] for r in GAIN_ROWS if "base" in meas.get(r.label, {})}
    text = ", ".join(f"{r.where} {r.metric.path[1].replace('_', '-')} {ev.fmt_measurement(r.metric, m)}"
                     for r, m in seen.items())
    return any(m.interval is not None and m.interval.low > 0 for m in seen.values()), text or "not measured"


def _fim_expectation(chs: list[dict], meas: dict) -> dict:
    """Expectation 3, judged on the suffix-gain rows, once the base is seen to infill. Why those: a fine-tune's
    middle loss falls on the domain (adaptation) and rises on general code (forgetting, expectation 2) whether
    or not it can still infill, and its generation rows move with both too; the gain, the same middle's loss
    without the suffix minus with it, is what reading the suffix is worth, so it moves with FIM ability alone.
    Every FIM row is still in the tables."""
    fim50 = [_find(chs, r.label, REFERENCE, "base") for r in GAIN_ROWS]
    fim0 = [_find(chs, r.label, "lora-fim0", REFERENCE) for r in GAIN_ROWS]
    measurable = all(fim50) and all(fim0)
    infills, gains = base_uses_suffix(meas)
    evidence = "; ".join(f"{c['label']}: {REFERENCE} vs base {c['text']}, lora-fim0 vs {REFERENCE} {d['text']}"
                         for c, d in zip(fim50, fim0)) if measurable else ""
    if measurable and not infills:
        measurable, evidence = False, (f"not testable: the base model does not use the suffix (its suffix gain, "
                                       f"nats/token: {gains}; an interval above 0 on one held-out set needed). {evidence}")
    return {"claim": f"FIM survives only when FIM data is in the mix: {REFERENCE} (FIM 0.5) is significantly worse "
                     "than the base on no suffix-gain row, and lora-fim0 is significantly worse than it on at least half",
            "holds": (not any(c["verdict"] == "**worse**" for c in fim50)
                      and sum(c["verdict"] == "**worse**" for c in fim0) * 2 >= len(fim0)) if measurable else None,
            "evidence": evidence}


def expectations(chs: list[dict], models: list[str], skipped: list[dict], meas: dict | None = None) -> list[dict]:
    """The issue's four expectations, each with holds = True / False / None (not measurable here)."""
    tuned = [m for m in models if m != "base"]
    out = []
    dom = {m: _find(chs, "domain val loss (nats/token)", m, "base") for m in tuned}
    ok = [c["verdict"] == "better" for c in dom.values() if c]
    out.append({"claim": "the domain gets better: every fine-tune lowers the domain val loss (interval below 0)",
                "holds": all(ok) if ok else None,
                "evidence": "; ".join(f"{m} {c['text']}" for m, c in dom.items() if c)})
    gen = {m: _find(chs, "general val loss (nats/token)", m, "base") for m in tuned}
    pairs = [(m, gen[m], dom[m]) for m in tuned if gen[m] and dom[m]]
    out.append({"claim": "general ability drops by a bounded amount: each fine-tune's general val loss rises by less "
                         "(upper 95% bound) than its domain val loss falls",
                "holds": all(g["high"] < -d["estimate"] for _, g, d in pairs) if pairs else None,
                "evidence": "; ".join(f"{m} general {g['text']}" for m, g, _ in pairs)})
    out.append(_fim_expectation(chs, meas or {}))
    q = [c for c in chs if c["model"] == "qlora" and c["against"] == REFERENCE]
    why = next((s["why"] for s in skipped if s["variant"] == "qlora"), None)
    out.append({"claim": f"QLoRA lands within noise of bf16 LoRA: no paired interval (qlora - {REFERENCE}) excludes 0",
                "holds": (not any(c["verdict"] != "no significant change" for c in q)) if q else None,
                "evidence": "; ".join(f"{c['label']} {c['text']}" for c in q) if q else f"not run: {why or 'no results'}"})
    return out


def training(ctx) -> dict:
    out = {}
    for name in ["pretrain", *(v.name for v in VARIANTS)]:
        p = ctx.path("runs", name, "summary.json")
        if p.is_file():
            s = json.loads(p.read_text())
            out[name] = {k: s.get(k) for k in ("steps", "tokens", "seconds", "tok_per_s", "final_loss", "val_loss",
                                               "trainable_params", "peak_reserved_gib")}
    return out


def environment() -> dict:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": gpu or f"CPU ({platform.processor() or platform.machine()})", "date": datetime.date.today().isoformat(),
            # the GPU machine's copy of the checkout has no git: the caller names the commit (docs/quality.md)
            "commit": os.environ.get("CODETUNE_COMMIT") or _git_commit()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write(ctx) -> dict:
    from codetune.atomic import write_text

    from . import plots, tables
    from .pipeline import models as model_names

    models = model_names(ctx)
    meas = measurements(ctx, models)
    chs = changes(meas, models)
    corpus = json.loads(ctx.path("corpus", "corpus.json").read_text())
    result = {
        "scale": ctx.scale.name, "seed": ctx.seed, "settings": asdict(ctx.scale), "environment": environment(),
        "variants": {v.name: asdict(v) for v in VARIANTS}, "skipped": ctx.skipped(),
        "corpus": {k: corpus[k] for k in ("packages", "splits", "bytes", "dropped_domain_copies")},
        "tasks": {s: len(ctx.path("corpus", f"tasks-{s}.jsonl").read_text().splitlines()) for s in ("domain", "general")},
        "training": training(ctx),
        "metrics": [{"label": r.label, "kind": r.metric.kind, "higher_is_better": r.metric.higher_is_better,
                     "models": {m: {"value": x.value, "n": x.n, "low": x.interval.low if x.interval else None,
                                    "high": x.interval.high if x.interval else None}
                                for m, x in meas.get(r.label, {}).items()}} for r in ROWS],
        "changes": chs, "expectations": expectations(chs, models, ctx.skipped(), meas),
    }
    folder = ctx.path("report")
    folder.mkdir(parents=True, exist_ok=True)
    figures = plots.write(ctx, meas, models, folder)
    write_text(folder / "results.json", json.dumps(result, indent=1))
    write_text(folder / "results.md", tables.markdown(result, meas, models, figures))
    return result
