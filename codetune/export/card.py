"""The model card (README.md) written next to a merged model: what it was trained from, on what data,
with which settings, and how it scored — so a merged directory explains itself when shared."""

from __future__ import annotations

import json
from pathlib import Path


def _read_results(path: Path) -> dict | None:
    """Scores from one JSON file; `codetune eval`'s results.json keeps them under "models" (base/tuned)
    beside its config, which the card already shows."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return data["models"] if isinstance(data.get("models"), dict) else data


def find_eval_results(adapter_dir: Path, info: dict, files: list[Path] | None = None) -> dict:
    """Evaluation results for this run: codetune.json's own "eval" entry, the `files` given (merge
    --eval-results), then <run>/eval/*.json (the adapter is <run>/adapter or
    <run>/checkpoints/step-N/adapter). Missing or unreadable files are skipped: a card without scores
    is better than no merge."""
    results: dict = {}
    if isinstance(info.get("eval"), dict):
        results.update(info["eval"])
    for f in files or []:
        found = _read_results(f)
        if found is None:
            raise ValueError(f"--eval-results {f}: not a readable JSON object (give `codetune eval`'s results.json)")
        results.update(found)
    adapter_dir = Path(adapter_dir).resolve()
    for run_dir in (adapter_dir, adapter_dir.parent, *adapter_dir.parents[1:3]):
        eval_dir = run_dir / "eval"
        if not eval_dir.is_dir():
            continue
        for f in sorted(eval_dir.glob("*.json")):
            found = _read_results(f)
            if found is not None:
                results.setdefault(f.stem, found)
        break
    return results


def _table(d: dict) -> list[str]:
    rows = ["| key | value |", "|---|---|"]
    for k, v in d.items():
        text = json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)
        text = text.replace("|", "\\|")  # a pipe inside a cell would split the Markdown table
        rows.append(f"| {k} | {text} |")
    return rows


def _scalars(d: dict, prefix: str = "") -> dict:
    """Flatten nested results to 'a.b: number' pairs so the card shows scores, not raw dumps."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def model_card(info: dict, eval_results: dict, precision: str) -> str:
    model = info.get("model", {})
    base = model.get("model", "unknown")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [code, codetune, fill-in-the-middle]",
        "---",
        "",
        f"# {base} fine-tuned with codetune",
        "",
        f"Base model `{base}` with a `{info.get('method', 'lora')}` fine-tune merged into its "
        f"{precision} weights by `codetune merge`. Load it with "
        "`transformers.AutoModelForCausalLM.from_pretrained(<this directory>)`.",
        "",
        "Fill-in-the-middle prompts: `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>`; "
        "generation ends at `<|endoftext|>`.",
        "",
        "## Training configuration",
        "",
    ]
    for section in ("model", "adapter", "train"):
        if isinstance(info.get(section), dict):
            lines += [f"### {section}", "", *_table(info[section]), ""]
    lines += ["## Data", ""]
    manifest = info.get("data_manifest")
    if isinstance(manifest, dict) and manifest:
        lines += _table(_scalars(manifest))
    else:
        lines.append("No data manifest was recorded with this run.")
    lines += ["", "## Evaluation", ""]
    if eval_results:
        lines += _table(_scalars(eval_results))
    else:
        lines.append("No evaluation results were found for this run (run `codetune eval` and merge again to "
                     "include them).")
    return "\n".join(lines) + "\n"
