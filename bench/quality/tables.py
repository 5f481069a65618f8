"""results.md: what ran, the scores with their intervals, the paired changes, the expectations."""

from __future__ import annotations

from codetune.eval import report as ev

from .report import ROWS
from .scale import REFERENCE, VARIANTS

SMOKE_NOTE = ("**Smoke run**: a toy model, a few MB of code and a handful of steps, to check that the pipeline "
              "runs end to end. Its numbers say nothing about fine-tuning quality.")


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _n(meas_row: dict) -> str:
    ns = sorted({m.n for m in meas_row.values() if m.n is not None})
    return "/".join(str(n) for n in ns) or "—"


def markdown(result: dict, meas: dict, models: list[str], figures: list[str]) -> str:
    by_label = {r.label: r for r in ROWS}
    env, s = result["environment"], result["settings"]
    out = [f"# Fine-tuning quality: held-out domain `{s['corpus']['domain']}` ({result['scale']} run, seed {result['seed']})", ""]
    if result["scale"] == "smoke":
        out += [SMOKE_NOTE, ""]
    when = "".join(f", {k} {env[k]}" for k in ("date", "commit") if env.get(k))  # (records before session 9 lack them)
    out += [f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}{when}. "
            f"Model: `{s['model']}` pretrained from random init here, then fine-tuned on the domain's training files.", ""]
    out += ["Models: `base` = the pretrained model; " + "; ".join(
        f"`{v.name}` = {v.what.format(rank=s['lora_rank'], last=s['last_layers'])}"
        for v in VARIANTS) + ".", ""]
    for sk in result["skipped"]:
        out += [f"Not run: `{sk['variant']}` ({sk['why']}).", ""]
    c, t = result["corpus"], result["tasks"]
    out += [f"Corpus (bytes of Python): pretrain {c['bytes']['pretrain']:,}, general held-out {c['bytes']['general-test']:,}, "
            f"domain train {c['bytes']['domain-train']:,}, domain held-out {c['bytes']['domain-test']:,}; "
            f"{len(c['packages']) - 1} general packages. Execution tasks: {t['domain']} domain, {t['general']} general.", ""]

    out += ["## Scores (95% intervals)", ""]
    rows = []
    for label, row in meas.items():
        metric = by_label[label].metric
        rows.append([label, _n(row), *(ev.fmt_measurement(metric, row.get(m)) for m in models)])
    out += _md_table(["metric", "n", *models], rows) + [""]

    for against in ("base", REFERENCE):
        others = [m for m in models if m not in ("base", against)]
        chs = {(c["label"], c["model"]): c for c in result["changes"] if c["against"] == against}
        if not others or not chs:
            continue
        out += [f"## Change against `{against}` (paired, 95% intervals)", ""]
        rows = [[label, *(f"{chs[(label, m)]['text']} {chs[(label, m)]['verdict']}" if (label, m) in chs else "—"
                          for m in others)] for label in meas]
        out += _md_table(["metric", *others], rows) + [""]

    out += ["## Expectations", ""]
    for e in result["expectations"]:
        mark = {True: "holds", False: "**does not hold**", None: "not measured"}[e["holds"]]
        out += [f"- {e['claim']}: {mark}." + (f" {e['evidence']}." if e["evidence"] else "")]
    out += [""]

    out += ["## Training runs", ""]
    rows = [[name, str(r.get("steps")), f"{r.get('tokens') or 0:,}", str(r.get("seconds")), str(r.get("tok_per_s")),
             _f(r.get("final_loss")), _f(r.get("val_loss")), f"{r.get('trainable_params') or 0:,}"]
            for name, r in result["training"].items()]
    out += _md_table(["run", "steps", "tokens", "seconds", "tok/s", "last train loss", "val loss", "trained params"], rows)
    out += [""] + [f"![{f}]({f})" for f in figures] + [""]
    out += [ev.METHOD_NOTE, ""]
    return "\n".join(out)


def _f(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "—"
