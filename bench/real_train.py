"""The real path: `codetune prepare` + `codetune train` (the CLI users run) on prepared real code, with the
10 GB preset, measured at each length — and, beside each run, what `codetune plan` predicted for it.

The corpus is the Python sources of packages installed on the machine (on the GPU machine: transformers,
accelerate, peft, ...), prepared once per length into WORKDIR/data-<seq> and reused. Each run trains on
the random-init stable-code-3b shape (values don't change speed or memory) with validation and
checkpoints on (every --eval-every steps, the preset's eval_batches), then reports: the median tokens/s of
the steady-state steps (from step 6, validation steps excluded: their time is not in a step's timing), the
end-to-end tokens/s over the whole run (validation and checkpoints included), the peak reserved memory of
the training steps and of the validation passes, and the planner's prediction for both.

Usage (GPU machine, project root):
  python3 bench/real_train.py --tokenizer tests/fixtures/gpt-neox-20b.json --seq 4096 16384 [--set preset|planner]
Prints one JSON line per run (bench/run_gpu.sh collects them; bench/report.py tabulates them).
`--repo DIR` runs another checkout's CLI (a before/after comparison in one call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "configs/stable-code-3b-10gb.yaml"
# The corpus of the real-path issue's measurement (../shared/bench/real_path.sh), so numbers compare.
CORPUS = ("accelerate", "peft", "safetensors", "transformers/generation", "transformers/models/llama",
          "transformers/models/bert", "transformers/models/t5")

# --set planner: the configurations the planner is held to (tests/plan/test_real_runs.py), each as the
# overrides on top of the preset. Lengths come from --seq.
PLANNER_SET = {
    "preset": {},
    "int8": {"model.precision": "int8"},
    "bf16": {"model.precision": "bf16"},
    "last8": {"adapter.train_layers": "last:8"},
    "rank64": {"adapter.rank": 64, "adapter.alpha": 128.0},
    "batch2": {"train.batch_size": 2},
    "graphs-off": {"train.cuda_graphs": "off"},
    "offload-off": {"train.offload_activations": "off"},
    "paged8bit": {"train.optimizer": "paged_adamw_8bit"},
    "attention-only": {"adapter.targets": "attention"},
    "no-fast-lora": {"train.fast_lora": False},
    "no-cpu-emb": {"train.cpu_embeddings": False},
}


def cap_for(seq: int) -> str:
    """The VRAM cap of a length: the preset's 10 GiB, and 6 GiB at 16k (the setting the records compare)."""
    return "6GiB" if seq >= 16384 else "10GiB"


def argv_of(overrides: dict) -> list[str]:
    """CLI flags for section-qualified overrides ({"train.batch_size": 2} -> --batch-size 2)."""
    out = []
    for key, value in overrides.items():
        flag = "--" + key.partition(".")[2].replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def prepare(seq: int, tok: str, workdir: Path, repo: Path, corpus: list[str]) -> Path:
    data = workdir / f"data-{seq}"
    if (data / "manifest.json").exists():
        return data
    cmd = [sys.executable, "-m", "codetune", "prepare", "--config", PRESET, "--sources", *corpus,
           "--tokenizer", tok, "--data-dir", str(data), "--seq-len", str(seq), "--workers", str(os.cpu_count() or 2)]
    with open(workdir / f"prepare-{seq}.log", "w") as log:
        subprocess.run(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, check=True)
    return data


def predict(overrides: dict, seq: int) -> dict:
    """The planner's peak reserved for this run (training steps, validation), in GiB."""
    sys.path.insert(0, str(ROOT))
    from codetune.config import build, load_yaml
    from codetune.plan.memory import estimate

    flags = {"data.seq_len": seq, "train.max_vram": cap_for(seq), "model.random_init": True, **overrides}
    cfgs = build(["model", "adapter", "data", "train"], load_yaml(ROOT / PRESET), flags, validate=False)
    b = estimate(cfgs)
    out = {"planned_reserved_gib": round(b.peak_reserved / 2**30, 3)}
    if getattr(b, "val_peak_reserved", None) is not None:
        out["planned_val_reserved_gib"] = round(b.val_peak_reserved / 2**30, 3)
    return out


def measure(rows: list[dict], summary: dict) -> dict:
    steps = [r for r in rows if "tok_per_s" in r]
    steady = [r["tok_per_s"] for r in steps[5:] if "val_loss" not in r] or [r["tok_per_s"] for r in steps]
    last = steps[-1] if steps else {}
    out = {"steps": len(steps), "median_tok_per_s": round(statistics.median(steady), 1),
           "min_tok_per_s": min(steady), "max_tok_per_s": max(steady),
           "wall_tok_per_s": summary.get("tok_per_s"), "val_loss": summary.get("val_loss"),
           "cuda_graphs": summary.get("cuda_graphs")}
    for key in ("train_peak_reserved_gib", "val_peak_reserved_gib", "train_peak_alloc_gib", "val_peak_alloc_gib"):
        if key in last or key in summary:
            out[key] = summary.get(key, last.get(key))
    out["peak_reserved_gib"] = max([r.get("peak_reserved_gib", 0) for r in steps]
                                   + [out.get("train_peak_reserved_gib", 0), out.get("val_peak_reserved_gib", 0)])
    return out


def run_one(name: str, overrides: dict, seq: int, a, data: Path, repo: Path) -> dict:
    out_dir = Path(a.workdir) / f"run-{name}-{seq}-{int(time.time() * 1000)}"
    flags = {"data.seq_len": seq, "train.max_vram": cap_for(seq), "train.steps": a.steps(seq),
             "train.grad_accum": 1, "train.eval_every": a.eval_every,
             "train.save_every": a.eval_every if a.save_every is None else a.save_every,
             **({"train.eval_batches": a.eval_batches} if a.eval_batches else {}), **overrides}
    cmd = [sys.executable, "-m", "codetune", "train", "--config", PRESET, "--random-init",
           "--data-dir", str(data), "--out-dir", str(out_dir), "--no-progress", *argv_of(flags),
           *(["--num-gpus", str(a.num_gpus), "--distributed", a.distributed] if a.num_gpus > 1 else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    rec = {"path": "codetune train, prepared real code", "config": name, "seq": seq, "repo": str(repo),
           "overrides": overrides, "max_vram": cap_for(seq), "eval_every": a.eval_every, "num_gpus": a.num_gpus,
           "distributed": a.distributed if a.num_gpus > 1 else None,
           "seconds": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        (Path(a.workdir) / f"{out_dir.name}.log").write_text(proc.stdout + proc.stderr)
        return {**rec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    metrics = (out_dir / "metrics.jsonl").read_text()
    if a.keep_metrics:  # (per-step rows, for a look at outliers)
        (Path(a.keep_metrics) / f"metrics-{name}-{seq}.jsonl").write_text(metrics)
    rows = [json.loads(ln) for ln in metrics.splitlines() if ln.strip()]
    summary = json.loads((out_dir / "summary.json").read_text())
    rec.update(measure(rows, summary))
    if repo == ROOT:
        rec.update(predict(overrides, seq))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--set", choices=["preset", "planner"], default="preset")
    ap.add_argument("--only", nargs="*", default=None, help="names from the set to run (default: all)")
    ap.add_argument("--workdir", default="/tmp/real-train")
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose CLI runs (default: this one)")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=240_000, help="training tokens per run (sets the steps)")
    ap.add_argument("--min-steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=None, help="default: --eval-every; 0 = only at the end")
    ap.add_argument("--eval-batches", type=int, default=None, help="default: the preset's")
    ap.add_argument("--keep-metrics", default=None, help="folder for each run's metrics.jsonl")
    ap.add_argument("--num-gpus", type=int, default=1, help="`codetune train --num-gpus` (tokens/s: all GPUs "
                    "together; memory: the main process's GPU)")
    ap.add_argument("--distributed", choices=["ddp", "fsdp"], default="ddp", help="with --num-gpus > 1")
    a = ap.parse_args()
    a.steps = lambda seq: max(a.min_steps, a.tokens // seq)
    for d in (a.workdir, a.keep_metrics):
        if d:
            Path(d).mkdir(parents=True, exist_ok=True)
    repo = Path(a.repo).resolve()
    site = Path(sysconfig.get_paths()["purelib"])
    corpus = [str(site / c) for c in CORPUS if (site / c).exists()]
    tok = str(Path(a.tokenizer).resolve())
    configs = PLANNER_SET if a.set == "planner" else {"preset": {}}
    for seq in a.seq:
        data = prepare(seq, tok, Path(a.workdir), ROOT, corpus)
        for name, overrides in configs.items():
            if a.only and name not in a.only:
                continue
            print(json.dumps(run_one(name, overrides, seq, a, data, repo)), flush=True)


if __name__ == "__main__":
    main()
