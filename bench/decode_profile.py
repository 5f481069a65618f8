"""Where a one-token decode step's GPU time goes (issue 17, target 1: bf16 >= 400 tok/s on an H200, i.e.
<= 2.5 ms a token, against ~1.2 ms to read the weights once): torch.profiler over a few eager static-cache
steps of the random-init stable-code-3b shape after a 2,000-token prefill, grouped by kernel. A CUDA graph
removes the launch gaps between these kernels but not their own time, so the table says what a graphed
step still costs: the matrix-vector products (bandwidth), or the many small elementwise kernels
(rotary's slices and concatenations, norms, residual adds, the cache writes).

    python3 bench/decode_profile.py --tokenizer tests/fixtures/gpt-neox-20b.json --precision bf16
Prints the kernel table, then one JSON line: steps, kernels per step, summed kernel time per step, and the
share of the matrix products (gemv/gemm kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

MATMUL_HINTS = ("gemv", "gemm", "sm90_xmma", "cutlass", "ampere_bf16", "Kernel2", "splitK", "nvjet")


def main() -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    from codetune.config import ModelConfig
    from codetune.export.generate import load_for_inference
    from codetune.model.adapters import causal_lm
    from codetune.model.static_cache import cache_kwarg
    from codetune.model.step_attention import STEP_KERNELS, StepAttention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="tests/fixtures/gpt-neox-20b.json")
    ap.add_argument("--model", default="stable-code-3b")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--prompt", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--step-kernels", default=",".join(STEP_KERNELS),
                    help="the static-cache passes' attention (model/step_attention.STEP_KERNELS); an A/B: flash,efficient,math")
    a = ap.parse_args()
    device = torch.device(a.device)
    cfg = ModelConfig(model=a.model, random_init=True, precision=a.precision, tokenizer=a.tokenizer)
    cfg.validate()
    model, _, _ = load_for_inference(cfg, None, device)
    cache = StaticCache(config=causal_lm(model).config, max_cache_len=4096 if a.prompt > 1000 else 512)
    kw = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    token = torch.full((1, 1), 1234, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    attention = StepAttention(model, tuple(a.step_kernels.split(",")))
    with torch.inference_mode(), attention():
        model(input_ids=torch.randint(0, 50000, (1, a.prompt), device=device), **kw)
        for _ in range(3):  # warm: kernels chosen, caches filled
            model(input_ids=token, **kw)
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            model(input_ids=token, **kw)
        sync()
        wall = (time.perf_counter() - t0) / a.steps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(a.steps):
                model(input_ids=token, **kw)
            sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 1e3 / a.steps
    mm = sum(e.device_time for e in kernels if any(h in e.name for h in MATMUL_HINTS)) / 1e3 / a.steps
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if kernels else "self_cpu_time_total",
                                    row_limit=30, max_name_column_width=80))
    print(json.dumps({"check": "decode-profile", "model": a.model, "precision": a.precision, "prompt": a.prompt,
                      "steps": a.steps, "attention": attention.describe(), "split_why_not": attention.why_not,
                      "eager_step_wall_ms": round(wall * 1e3, 3),
                      "kernels_per_step": len(kernels) / a.steps, "kernel_ms_per_step": round(total, 3),
                      "matmul_kernel_ms_per_step": round(mm, 3),
                      "matmul_share": round(mm / total, 3) if total else None}), flush=True)


if __name__ == "__main__":
    main()
