"""Issue-4 GPU verification: `codetune train` (the real CLI) on the random-init stable-code-3b shape with
the 10 GB preset under --max-vram, on shards of real code, then a resume. Prints one JSON summary.

The shards are packed from this machine's Python standard library with the GPT-NeoX tokenizer through
codetune's shard writer (the GPU machine lacks datasketch / detect-secrets for the full `prepare`, which
is CPU code covered by the CPU test suite).
Usage: python3 bench/gpu_train_check.py --tokenizer gpt-neox-20b.json --out DIR [--steps 50] [--seq 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_shards(tok_path: str, root: Path, seq_len: int, max_files: int = 400) -> None:
    from transformers import PreTrainedTokenizerFast

    from codetune.data.shards import Packer, ShardWriter
    from codetune.model.tokenizer import ensure_special_tokens, tokenizer_fingerprint

    tok = ensure_special_tokens(PreTrainedTokenizerFast(tokenizer_file=tok_path))
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    for split, part in (("train", files[8:]), ("val", files[:8])):
        p = Packer(ShardWriter(root / split, seq_len, len(tok)), tok.eos_token_id, tok.pad_token_id)
        for f in part:
            p.add_document(tok.encode(f.read_text(errors="replace"), add_special_tokens=False))
        p.finish()
    tok.save_pretrained(root / "tokenizer")
    (root / "manifest.json").write_text(json.dumps({"tokenizer": tokenizer_fingerprint(tok), "sources": ["stdlib"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--max-vram", default="10GiB")
    ap.add_argument("--model", default="stable-code-3b")
    ap.add_argument("--precision", default="nf4")
    a = ap.parse_args()
    from codetune.cli import main as cli
    from codetune.metrics import read_metrics

    out = Path(a.out)
    make_shards(a.tokenizer, out / "data", a.seq)
    common = ["train", "--config", "configs/stable-code-3b-10gb.yaml", "--random-init", "--data-dir", str(out / "data"),
              "--seq-len", str(a.seq), "--out-dir", str(out / "run"), "--max-vram", a.max_vram, "--grad-accum", "1",
              "--lr", "2e-4", "--warmup-steps", "5", "--eval-every", "25", "--eval-batches", "4",
              "--save-every", "25", "--no-progress", "--model", a.model, "--precision", a.precision]
    rc1 = cli(common + ["--steps", str(a.steps)])
    first = json.loads((out / "run" / "summary.json").read_text())
    rc2 = cli(common + ["--steps", str(a.steps + 10), "--resume"])
    rows = read_metrics(out / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    print(json.dumps({"check": "train-10gb-preset", "rc": [rc1, rc2], "steps_logged": len(losses),
                      "loss_first5": sum(losses[:5]) / 5, "loss_last5": sum(losses[-5:]) / 5,
                      "val": [r["val_loss"] for r in rows if "val_loss" in r],
                      "first_run": first, "checkpoints": sorted(p.name for p in (out / "run" / "checkpoints").iterdir())}))


if __name__ == "__main__":
    main()
