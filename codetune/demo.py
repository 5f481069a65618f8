"""`codetune demo`: the whole product on a laptop CPU in a few minutes, with nothing to download —
prepare the Python standard library's own .py files, LoRA-train the 2-layer tiny-stablelm on them,
merge the adapter, and complete a code prompt with the result. Every stage is the real one; only the
model is small (and random-init, so the completion is code-flavoured noise, not good code)."""

from __future__ import annotations

import shutil
import sys
import sysconfig
import time
from pathlib import Path

from codetune.config import build

CLI_FLAGS = [
    (("--out",), dict(default="runs/demo", help="folder for everything the demo writes (default: runs/demo)")),
    (("--steps",), dict(type=int, default=300, help="training steps (default: 300)")),
    (("--max-files",), dict(type=int, default=1200, help="standard-library files to use (default: 1200)")),
    (("--seq-len",), dict(type=int, default=256, help="tokens per packed sequence (default: 256)")),
]
MARKER = ".codetune-demo"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def fresh_dir(out: Path) -> None:
    """The demo may clear only a folder it made itself (marked), never someone else's data."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SystemExit(f"codetune demo: {out} exists and was not made by the demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by codetune demo; safe to delete\n")


def run(cfgs: dict, ns) -> int:
    from transformers.utils import logging as hf_logging

    from codetune.data.prepare import prepare
    from codetune.export.generate import complete
    from codetune.export.merge import merge_adapter
    from codetune.train.recipe import main as train_main

    hf_logging.disable_progress_bar()  # the demo has its own narration; per-file loading bars are noise
    t0 = time.time()
    out = Path(ns.out)
    fresh_dir(out)
    say = lambda s: print(f"\n[codetune demo] {s}", file=sys.stderr, flush=True)  # noqa: E731
    flags = {"model.model": "tiny-stablelm", "model.random_init": True, "model.precision": "fp32",
             "data.sources": [str(stdlib_dir())], "data.data_dir": str(out / "data"), "data.seq_len": ns.seq_len,
             "data.max_files": ns.max_files, "data.decontaminate": True,
             "adapter.rank": 16, "adapter.alpha": 32.0,
             "train.out_dir": str(out / "train"), "train.steps": ns.steps, "train.batch_size": 8,
             "train.lr": 3e-3, "train.warmup_steps": 20, "train.eval_every": max(1, ns.steps // 6),
             "train.eval_batches": 8, "train.save_every": max(1, ns.steps // 2), "train.tensorboard": True}
    cfgs = build(["model", "adapter", "data", "train"], flags=flags)

    say(f"1/4 prepare: {ns.max_files} files of {stdlib_dir()} -> {out / 'data'}")
    manifest = prepare(cfgs["data"], cfgs["model"])
    splits = manifest.get("splits", {})
    say("    " + ", ".join(f"{s}: {m.get('n_seq')} sequences / {m.get('n_tokens')} tokens" for s, m in splits.items()))

    say(f"2/4 train: tiny-stablelm + LoRA r=16 on the CPU, {ns.steps} steps")
    summary = train_main(cfgs)

    say("3/4 merge the adapter into the base weights")
    merged = merge_adapter(out / "train" / "adapter", out / "merged")

    say("4/4 generate: complete a code prompt with the merged model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    prompt = "def read_config(path):\n    "
    print(prompt, end="", flush=True)
    complete(model, tok, prompt, max_new_tokens=48, temperature=0.7, on_text=lambda s: print(s, end="", flush=True))
    print()

    say(f"done in {time.time() - t0:.0f} s. Written:\n"
        f"    data shards + manifest + report  {out / 'data'}\n"
        f"    checkpoints, metrics.jsonl, loss.png, tensorboard/  {out / 'train'}\n"
        f"    LoRA adapter (PEFT format)       {out / 'train' / 'adapter'}\n"
        f"    merged model (HF format)         {merged}\n"
        f"    train loss {summary.get('final_loss'):.3f}, validation loss {summary.get('val_loss') or float('nan'):.3f}")
    return 0
