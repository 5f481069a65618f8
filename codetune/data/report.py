"""report.md with PNG charts: what the prepared data is made of and what was dropped and why, so a
user can see at a glance whether a filter ate their code."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from codetune.atomic import write_file
from codetune.data.stats import Stats

REPORT_FILES = ("report.md", "languages.png", "file_lengths.png", "token_lengths.png", "dropped.png")


def _fig():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=90, bbox_inches="tight", metadata={"Software": None}))
    plt.close(fig)


def _barh(plt, path: Path, labels: list[str], values: list[float], title: str, xlabel: str,
          fmt: str = "{:,.0f}") -> None:
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(labels), 3) + 1))
    bars = ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    ax.bar_label(bars, labels=[fmt.format(v) for v in values[::-1]], padding=3, fontsize=8)  # small bars stay readable
    ax.margins(x=0.15)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    _save(plt, fig, path)


def _hist(plt, path: Path, values: list[int], title: str, xlabel: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    v = np.asarray(values, dtype=np.float64)
    v = v[v > 0]
    if len(v):
        bins = np.logspace(np.log10(v.min()), np.log10(v.max()) + 1e-9, 40)
        ax.hist(v, bins=bins, color="#55a868")
        ax.set_xscale("log")
        ax.axvline(np.median(v), color="k", ls="--", label=f"median {np.median(v):,.0f}")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("documents")
    _save(plt, fig, path)


def write_report(out: Path, manifest: dict, stats: Stats) -> list[str]:
    """Writes report.md and its charts into `out`; returns their names (a subset of REPORT_FILES)."""
    plt = _fig()
    langs = stats.languages.most_common()
    charts = []
    if langs:
        _barh(plt, out / "languages.png", [k for k, _ in langs], [stats.language_bytes[k] / 1e6 for k, _ in langs],
              "Kept data by language", "MB", fmt="{:,.1f}")
        charts.append(("Language mix", "languages.png"))
    _hist(plt, out / "file_lengths.png", stats.file_bytes, "Kept file sizes", "bytes (log scale)")
    _hist(plt, out / "token_lengths.png", stats.doc_tokens, "Tokens per kept document", "tokens (log scale)")
    charts += [("File lengths", "file_lengths.png"), ("Token lengths", "token_lengths.png")]
    drops = sorted(((f"{st}: {r}", n) for st, rs in stats.dropped.items() for r, n in rs.items()),
                   key=lambda x: -x[1])
    if drops:
        _barh(plt, out / "dropped.png", [k for k, _ in drops], [n for _, n in drops], "Dropped files by reason", "files")
        charts.append(("Dropped and why", "dropped.png"))
    (out / "report.md").write_text(render_markdown(manifest, stats, charts))
    return ["report.md"] + [png for _, png in charts]


def render_markdown(m: dict, stats: Stats, charts: list[tuple[str, str]]) -> str:
    c = m["counts"]
    docs = c.get("split_documents", {})
    lines = ["# codetune prepare report", "",
             f"Inputs: {len(m['sources'])} source(s), {c['files_seen']:,} files, {c['input_bytes'] / 1e6:,.1f} MB "
             f"(content hash `{m['input_sha256'][:16]}`). Tokenizer `{m['tokenizer']}`.", "",
             "| split | documents | sequences | tokens |", "|---|---:|---:|---:|"]
    for split, meta in m["splits"].items():
        lines.append(f"| {split} | {docs.get(split, 0):,} | {meta['n_seq']:,} | {meta['n_tokens']:,} |")
    if sp := m.get("split"):
        lines += ["", split_sentence(sp) + "."]
    if kinds := c.get("kinds"):
        lines += ["", "| kind | seen | kept | dropped | tokens | tokens with loss |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['seen']:,} | {v['kept']:,} | {v['dropped']:,} | {v['tokens']:,} | {v['loss_tokens']:,} |"
                  for k, v in kinds.items()]
    if (mix := m.get("mix")) and mix.get("requested"):
        lines += ["", "Mix (train tokens): asked " + ", ".join(f"{k} {v:.0%}" for k, v in mix["requested"].items())
                  + "; packed " + ", ".join(f"{k} {v:.1%}" for k, v in mix["train_share"].items())
                  + " (repeats: " + ", ".join(f"{k} x{v:g}" for k, v in mix["repeat"].items()) + ")"]
    lines += ["", "## Stages", "", "| stage | kept | dropped (by reason) | MB/s per core |", "|---|---:|---|---:|"]
    for name, st in c["stages"].items():
        dropped = ", ".join(f"{r}: {n:,}" for r, n in st["dropped"].items()) or "-"
        lines.append(f"| {name} | {st['kept']:,} | {dropped} | {st.get('mb_per_cpu_second') or '-'} |")
    if c["redactions"]:
        lines += ["", "Redacted values: " + ", ".join(f"`{k}` {v:,}" for k, v in c["redactions"].items())]
    if c["fim"]:
        lines += ["", "FIM: " + ", ".join(f"{k} {v:,}" for k, v in c["fim"].items())]
    lines += ["", "## Decontamination", ""]
    if c["contaminated"]:
        lines += ["| file | matched |", "|---|---|"] + [f"| {x['path']} | {x['match']} |" for x in c["contaminated"]]
    else:
        lines.append("No file matched a benchmark snippet.")
    for title, png in charts:
        lines += ["", f"## {title}", "", f"![{title}]({png})"]
    return "\n".join(lines) + "\n"


def split_sentence(sp: dict) -> str:
    """How validation was chosen, in words (the report and prepare's summary say the same)."""
    if sp["unit"] == "none":
        return "No validation split (--val-fraction 0)"
    why = f"; {sp['note']}" if sp.get("note") else ""
    return (f"Validation by {sp['unit']}: {sp['val_units']:,} of {sp['units']:,} units, {sp['val_share']:.1%} of tokens "
            f"(--val-fraction {sp['val_fraction']}{why})")
