"""`codetune demo`: the whole product on a laptop CPU in about a minute, with nothing to download —
prepare library code from the Python standard library, train the 2-layer tiny-stablelm on it, merge,
and complete a code prompt with the result. Every stage is the real one; only the model is small.

The model starts from random weights, so the demo trains all of them (`--method full
--train-embeddings`): LoRA adapts what a base model already knows, and a random base knows nothing —
LoRA on it barely moves the loss. It then shows that training worked: the validation loss beside the
unigram baseline (the best any model that ignores context can do on the same tokens), and a completion."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from codetune.atomic import own_output_dir
from codetune.config import ConfigError, build

CLI_FLAGS = [
    (("--out",), dict(default="runs/demo", help="folder for everything the demo writes (default: runs/demo)")),
    (("--steps",), dict(type=int, default=500, help="training steps (default: 500)")),
    (("--max-files",), dict(type=int, default=None, help="standard-library files to use (default: all of the "
                                                          "demo's packages, about 250)")),
    (("--seq-len",), dict(type=int, default=256, help="tokens per packed sequence (default: 256)")),
    (("--json",), dict(action="store_true", help="print one JSON summary on stdout (for scripts) instead of the "
                                                 "human one")),
]
MARKER = ".codetune-demo"
# Ordinary library code (no test suites, no generated tables such as encodings/): a narrower, more
# regular corpus than the whole standard library, so a minute of training visibly learns its style.
PACKAGES = ("asyncio", "concurrent", "email", "http", "importlib", "json", "logging", "multiprocessing",
            "urllib", "wsgiref", "xml", "xmlrpc", "collections", "dbm", "html", "tomllib", "zoneinfo")
PROMPT = "def read_config(path):\n    "
EXPECT = ("What to expect: a 2-layer model 64 wide, trained for a minute, learns the look of Python — "
          "indentation, keywords, `self.`, brackets and common names — not working code. The same "
          "commands on stable-code-3b and your own code are the real use (README).")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def demo_sources() -> list[str]:
    found = [str(stdlib_dir() / p) for p in PACKAGES if (stdlib_dir() / p).is_dir()]
    if not found:
        raise ConfigError(f"no standard-library packages found under {stdlib_dir()}: this Python ships without "
                          "its library sources; run the demo with a full Python install")
    return found


def fresh_dir(out: Path) -> None:
    """The demo's folder, emptied: atomic.own_output_dir's rule (a new or empty folder, or one the demo
    marked as its own), then an earlier demo run's files go; never anything the demo did not make."""
    own_output_dir(out, MARKER, "codetune demo", "--out")
    for child in out.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@dataclass(frozen=True)
class Baseline:
    unigram_nats: float  # entropy of the val tokens' own frequencies
    uniform_nats: float  # ln(vocabulary): a model that knows nothing
    tokens: int


def unigram_baseline(data_dir: Path, rows: int, vocab_size: int) -> Baseline:
    """The loss of the best context-free predictor, fitted on the val tokens themselves (so a generous
    baseline): the entropy of the target tokens' frequencies in the prepared val shards."""
    import numpy as np

    from codetune.data.shards import PackedDataset

    ds = PackedDataset(data_dir, "val")
    counts = np.zeros(rows, dtype=np.int64)  # rows: the embedding's, >= every token id
    for i in range(len(ds)):
        labels = ds[i]["labels"].numpy()
        counts += np.bincount(labels[labels >= 0], minlength=rows)
    n = int(counts.sum())
    if n == 0:
        raise ConfigError(f"the demo's validation split in {data_dir} is empty; run it with more --max-files")
    p = counts[counts > 0] / n
    return Baseline(float(-(p * np.log(p)).sum()), math.log(vocab_size), n)


def demo_configs(ns, out: Path) -> dict:
    flags = {"model.model": "tiny-stablelm", "model.random_init": True, "model.precision": "fp32",
             "data.sources": demo_sources(), "data.data_dir": str(out / "data"), "data.seq_len": ns.seq_len,
             "data.max_files": ns.max_files, "data.decontaminate": True,
             "data.val_fraction": 0.1, "data.fim_rate": 0.0,  # the demo shows left-to-right completion; FIM data would halve its signal
             "adapter.method": "full", "adapter.train_embeddings": True,
             "train.out_dir": str(out / "train"), "train.steps": ns.steps, "train.batch_size": 8,
             # a random init takes a high rate (tiny model, short run); cosine decays it to 10%
             "train.lr": 2e-2, "train.warmup_steps": min(20, max(1, ns.steps // 10)),
             "train.eval_every": max(1, ns.steps // 3), "train.eval_batches": 64,
             "train.save_every": max(1, ns.steps // 2), "train.tensorboard": True}
    return build(["model", "adapter", "data", "train"], flags=flags)


def run(cfgs: dict, ns) -> int:
    import torch

    from codetune.data.prepare import prepare
    from codetune.export.generate import complete
    from codetune.export.merge import merge_adapter
    from codetune.model.load import quiet_transformers
    from codetune.train.recipe import main as train_main

    t0 = time.time()
    human = sys.stderr if ns.json else sys.stdout
    say = lambda s="": print(s, file=human, flush=True)  # noqa: E731
    out = Path(ns.out)
    fresh_dir(out)
    cfgs = demo_configs(ns, out)

    say(f"[1/4] prepare: library code from {stdlib_dir()} ({len(cfgs['data'].sources)} packages)")
    manifest = prepare(cfgs["data"], cfgs["model"], progress=sys.stderr.isatty())
    splits = manifest["splits"]
    say(f"      {splits['train']['n_tokens']:,} training and {splits['val']['n_tokens']:,} validation tokens "
        f"-> {out / 'data'} (report.md there)")

    say(f"[2/4] train: all weights of tiny-stablelm (2 layers, random init) on the CPU, {ns.steps} steps")
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's JSON summary: this summary replaces it
        summary = train_main(cfgs)
    rows = json.loads((out / "train" / "adapter" / "codetune.json").read_text())["vocab_size"]
    vocab = manifest.get("tokenizer_info", {}).get("vocab_size") or rows
    base = unigram_baseline(out / "data", rows, vocab)
    val = summary.get("val_loss")
    if val is None:
        raise ConfigError(f"the demo's validation split in {out / 'data'} is empty; run it with more --max-files")
    say(f"      validation loss {val:.3f} nats/token; unigram baseline {base.unigram_nats:.3f}, uniform "
        f"{base.uniform_nats:.3f} (ln {vocab}): {base.unigram_nats - val:.2f} below what token frequencies "
        "alone give, so it uses the context")
    say(f"      -> {out / 'train'} (metrics.jsonl, loss.png, tensorboard/, checkpoints/, adapter/)")

    say("[3/4] merge the trained weights into a standalone model")
    with quiet_transformers():
        merged = merge_adapter(out / "train" / "adapter", out / "merged")
    say(f"      -> {merged} (Hugging Face format)")

    say("[4/4] generate: complete a prompt with the trained model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    torch.manual_seed(0)  # the same completion on every run
    completion = complete(model, tok, PROMPT, max_new_tokens=64, temperature=0.6)
    say("      " + "\n      ".join((PROMPT + completion).splitlines()))
    say()
    say(EXPECT)
    seconds = time.time() - t0
    say(f"done in {seconds:.0f} s; everything is in {out}")
    if ns.json:
        print(json.dumps({"out": str(out), "seconds": round(seconds, 1),
                          "splits": {s: {"sequences": v["n_seq"], "tokens": v["n_tokens"]} for s, v in splits.items()},
                          "train_loss": summary.get("final_loss"), "val_loss": val, "baseline": asdict(base),
                          "data": str(out / "data"), "train": str(out / "train"),
                          "adapter": str(out / "train" / "adapter"), "merged": str(merged),
                          "prompt": PROMPT, "completion": completion}, indent=1))
    return 0
