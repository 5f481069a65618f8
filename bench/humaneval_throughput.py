"""Greedy HumanEval throughput of the random-init stable-code-3b shape: all 164 prompts through the
batched generator, exactly as `codetune eval` runs them. Random weights make the scores meaningless but
the speed real (same shapes, same kernels); generation runs to the token budget more often than a trained
model would, so this is close to a worst case for the budget.

    python3 bench/humaneval_throughput.py --tokenizer tokenizer.json --out result.json \
        [--precision nf4|bf16] [--max-vram 10GiB] [--limit N] [--max-new-tokens N] [--batch-size N] \
        [--decode eager,batched]

--decode takes one or more of codetune eval's --eval-decode modes; each runs the same prompts on the
same loaded model (one warm-up each, untimed), and with more than one the record says whether every
completion is identical across them and each mode's samples/s relative to the first. Each mode's record
and the comparison are printed as one JSON line each (bench/run_gpu.sh collects those); --out gets all.

CPU smoke test: --model tiny-stablelm --limit 4 --max-new-tokens 16 --decode eager,batched
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from model_source import add_model_flags, model_config, model_error, model_label  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or folder) of the stable-code / GPT-NeoX family "
                   "(required without --model-dir)")
    p.add_argument("--out", required=True, help="JSON result file")
    add_model_flags(p, "a CPU smoke test")
    p.add_argument("--precision", default="auto", choices=("auto", "nf4", "bf16", "fp16", "fp32"))
    p.add_argument("--max-vram", default=None, help="cap this process's GPU memory, e.g. 10GiB (the 10 GB preset)")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decode", default="batched", help="comma-separated --eval-decode modes to time, in order "
                                                        "(eager,batched compares them)")
    p.add_argument("--no-execute", action="store_true", help="skip running the completions in the sandbox")
    return p.parse_args(argv)


def cap_memory(max_vram: str | None, device: torch.device) -> float | None:
    """Emulate a smaller card through the trainer's own cap (OOM like a real card); returns the fraction."""
    from codetune.train.memory import cap_vram

    cap = cap_vram(max_vram, device)
    if cap is None:
        return None
    return min(1.0, cap / torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def versions() -> dict:
    import peft
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "peft": peft.__version__, "cuda": torch.version.cuda}
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return v


def main(argv=None) -> int:
    from codetune.eval import humaneval
    from codetune.eval.generation import EVAL_DECODE_MODES, GenSettings, GenStats, generate
    from codetune.eval.run import load_base

    a = parse_args(argv)
    error = model_error(a)
    if error:
        print(error, file=sys.stderr)
        return 2
    modes = [m.strip() for m in a.decode.split(",") if m.strip()]
    bad = [m for m in modes if m not in EVAL_DECODE_MODES] or ([] if modes else ["(none)"])
    if bad:
        print(f"--decode {a.decode}: unknown mode {bad[0]}; give one or more of {','.join(EVAL_DECODE_MODES)}",
              file=sys.stderr)
        return 2
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    frac = cap_memory(a.max_vram, device)
    cfg = model_config(a, a.precision)
    t = time.perf_counter()
    model, tok = load_base(cfg, data_dir="", device=device)
    load_s = time.perf_counter() - t
    problems = humaneval.load_problems(a.limit)
    prompts = [p["prompt"] for p in problems]
    env = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})",
        **model_label(a), "precision": cfg.precision if a.precision != "auto" else ("nf4" if device.type == "cuda" else "fp32"),
        "max_vram": a.max_vram, "memory_fraction": frac, "problems": len(prompts), "batch_size": a.batch_size,
        "max_new_tokens": a.max_new_tokens, "load_s": round(load_s, 1), "versions": versions(),
    }
    records, texts = [], {}
    for mode in modes:
        settings = GenSettings(max_new_tokens=a.max_new_tokens, stop=humaneval.STOP_SEQUENCES,
                               batch_size=a.batch_size, decode=mode)
        # warm-up (CUDA context, kernels, stop-string tables, a graph capture) is not timed
        generate(model, tok, prompts[:1], GenSettings(max_new_tokens=4, stop=settings.stop, batch_size=1, decode=mode))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats = GenStats()
        t0, done = time.perf_counter(), [0]

        def progress(n: int, mode=mode, t0=t0, done=done) -> None:  # per batch: a run cut short still shows its pace
            done[0] += n
            print(f"{mode}: {done[0]}/{len(prompts)} samples, {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                  flush=True)

        completions = generate(model, tok, prompts, settings, stats, progress=progress)
        texts[mode] = completions
        rec = {**env, **stats.as_dict(),
               "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if device.type == "cuda" else None,
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None}
        if not a.no_execute:
            t = time.perf_counter()
            _, summary = humaneval.score(problems, [[c] for c in completions])
            rec["sandbox"] = {"seconds": round(time.perf_counter() - t, 2), "statuses": summary["statuses"],
                              ("pass@1" if a.model_dir else "pass@1_meaningless_random_weights"): summary["pass@1"]}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    result = {"runs": records}
    if len(modes) > 1:
        first = records[0]
        result["comparison"] = {
            "modes": modes, "problems": len(prompts), "batch_size": a.batch_size, "precision": env["precision"],
            "identical_completions": {m: texts[m] == texts[modes[0]] for m in modes[1:]},
            "differing_problems": {m: [problems[i]["task_id"] for i, (x, y) in enumerate(zip(texts[m], texts[modes[0]]))
                                       if x != y] for m in modes[1:]},
            "samples_per_s": {r["decode"]: r["samples_per_s"] for r in records},
            **({"pass@1": {r["decode"]: r["sandbox"]["pass@1"] for r in records}} if a.model_dir and not a.no_execute else {}),
            "speedup_vs_first": {r["decode"]: round(r["samples_per_s"] / max(first["samples_per_s"], 1e-9), 2)
                                 for r in records[1:]},
        }
        print(json.dumps(result["comparison"]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
