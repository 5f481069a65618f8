"""Which model an inference benchmark loads (bench/decode_bench.py, bench/humaneval_throughput.py): the
random-init registry shape (`--model`, read with `--tokenizer`), or a trained model folder with its own
tokenizer (`--model-dir`, codetune merge's output, e.g. bench/quality's runs/quality/pretrained): trained
weights have real logit margins, where every decode path must give the eager path's text."""

from __future__ import annotations

from pathlib import Path


def add_model_flags(p, purpose: str) -> None:
    """--model and --model-dir; `purpose` ends --model's help (what the small model is for)."""
    p.add_argument("--model", default="stable-code-3b", help=f"registry name (tiny-stablelm for {purpose})")
    p.add_argument("--model-dir", default=None, help="a trained model folder (codetune merge's output, e.g. "
                   "bench/quality's runs/quality/pretrained) with its own tokenizer, instead of the random-init "
                   "--model: trained weights have real logit margins, where every decode path must give the "
                   "eager path's ids, completions and scores")


def model_error(a) -> str | None:
    """The one-line complaint about --model-dir / --tokenizer, or None."""
    if a.model_dir:
        if not (Path(a.model_dir) / "config.json").is_file():
            return f"--model-dir {a.model_dir}: no config.json there; give a model folder (codetune merge's output)"
        return None
    if not (a.tokenizer and Path(a.tokenizer).exists()):
        return f"--tokenizer {a.tokenizer}: no such file (needed for the random-init --model)"
    return None


def model_config(a, precision: str):
    """The ModelConfig to load, validated."""
    from codetune.config import ModelConfig

    cfg = (ModelConfig(model=a.model_dir, random_init=False, precision=precision) if a.model_dir else
           ModelConfig(model=a.model, random_init=True, precision=precision, tokenizer=a.tokenizer))
    cfg.validate()
    return cfg


def model_label(a) -> dict:
    """What each record says about the model: its folder (trained) or registry name (random init)."""
    return {"model": a.model_dir or a.model, "trained": bool(a.model_dir)}
