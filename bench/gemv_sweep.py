"""Whether the decode step's matrix-vector products can run nearer the memory bandwidth than cuBLAS does
(issue 17, target 1): codetune/model/kernels/gemv.py's Triton kernel against F.linear, bf16, at
stable-code-3b's one-token shapes — q|k|v stacked (7680 x 2560), o (2560 x 2560), gate|up stacked
(13824 x 2560), down (2560 x 6912) — for one row (single-stream decoding) and four. Each candidate runs
as a CUDA graph of 32 calls over 32 different weights (a step's 32 layers: no weight stays in L2 from
one call to the next), is checked against fp64, and is timed; reported with the bandwidth its weights
need, so the distance to the bound shows.

    python3 bench/gemv_sweep.py [--quick]
One JSON line per (shape, candidate), then one per shape naming the fastest and F.linear's time. The
kernel is not used by any decode path yet: this says whether wiring it in pays.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codetune.model.kernels import gemv as gk  # noqa: E402

SHAPES = {"qkv": (7680, 2560), "o": (2560, 2560), "gate_up": (13824, 2560), "down": (2560, 6912)}  # (N, K)
LAYERS = 32


def graph_time_us(fns, reps: int = 10) -> float:
    """Microseconds per call of the calls `fns` replayed as one CUDA graph."""
    for fn in fns[:2]:
        fn()  # compile and warm before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(fns))


def candidates(quick: bool):
    grid = itertools.product((4, 8, 16) if quick else (2, 4, 8, 16, 32), (256, 512) if quick else (128, 256, 512, 1024),
                             (1, 2) if quick else (1, 2, 4), (4, 8) if quick else (2, 4, 8))
    for block_n, block_k, split_k, warps in grid:
        yield {"block_n": block_n, "block_k": block_k, "split_k": split_k, "num_warps": warps}


def measure(head: dict, name: str, fns, ref: torch.Tensor, need: int) -> dict:
    try:
        err = (fns[0]().double() - ref).abs().max().item()
        us = graph_time_us(fns)
        r = {**head, "candidate": name, "us": round(us, 2), "gb_s": round(need / us / 1e3, 1), "max_error": err}
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
        r = {**head, "candidate": name, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    print(json.dumps(r), flush=True)
    return r


def sweep_shape(name: str, n: int, k: int, rows: int, quick: bool, gpu: str) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(LAYERS)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = x.double() @ weights[0].double().T
    need = n * k * 2  # bytes of one weight
    head = {"gpu": gpu, "shape": name, "n": n, "k": k, "rows": rows, "weight_mb": round(need / 1e6, 1)}
    results = [measure(head, "F.linear", [lambda w=w: F.linear(x, w) for w in weights], ref, need)]
    for c in candidates(quick):
        label = "gemv n{block_n} k{block_k} s{split_k} w{num_warps}".format(**c)
        results.append(measure(head, label, [lambda w=w, c=c: gk.gemv(x, w, **c) for w in weights], ref, need))
    ok = [r for r in results if "us" in r and r["candidate"] != "F.linear"]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    linear = results[0]
    return {**head, "best": best and best["candidate"], "best_us": best and best["us"],
            "best_gb_s": best and best["gb_s"], "best_error": best and best["max_error"],
            "linear_us": linear.get("us"), "linear_gb_s": linear.get("gb_s"), "linear_error": linear.get("max_error")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    a = ap.parse_args()
    if not torch.cuda.is_available() or not gk.available():
        print("gemv_sweep.py needs a CUDA device and Triton", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_properties(0).name
    for rows in a.rows:
        for name, (n, k) in SHAPES.items():
            print(json.dumps({"summary": True, **sweep_shape(name, n, k, rows, a.quick, gpu)}), flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
