"""Which launch shape the split-KV decode attention (codetune/model/kernels/decode_attention.py) should
use, on the GPU at hand (issue 17, target 1): one query token a head over stable-code-3b's attention shape
(32 heads of 80), bf16, at the caches decoding meets — a 512-position bucket holding 160 tokens, a 4,096
bucket holding 2,057 (the FIM request of the serve suite), a 16k one nearly full — for one row and for a
running batch of 16. Each candidate runs as a CUDA graph of 32 calls back to back (a step's 32 layers, as
the graphed step replays them), is checked against fp64 attention, and is timed; SDPA's kernels on the same
inputs are the baseline. Reported with the bandwidth the filled keys and values need, so the distance to
the bound shows.

    python3 bench/decode_attention_sweep.py [--quick]
One JSON line per (shape, candidate), then one per shape naming the fastest; the kernel's defaults
(BLOCK_N, NUM_WARPS, PROGRAMS_PER_SM, two_tiles) move to what this finds, with the record committed.
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

from codetune.model.kernels import decode_attention as da  # noqa: E402

SHAPES = [(1, 512, 160), (1, 4096, 2057), (1, 16384, 16000), (16, 512, 160), (16, 4096, 2057)]  # rows, L, filled
HEADS, HEAD_DIM, LAYERS = 32, 80, 32


def inputs(rows: int, length: int, filled: int, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(rows, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(rows, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype, generator=g)
    mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device="cuda")
    mask[..., :filled] = True
    return q, k, v, mask


def graph_time_us(fn, reps: int = 20) -> float:
    """Microseconds per call of `fn` replayed as a CUDA graph of LAYERS calls."""
    fn()  # compile and warm before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * LAYERS)


def candidates(quick: bool):
    yield {"name": "split (defaults)"}
    yield {"name": "split, one masked tile", "two_tiles": False}
    grid = itertools.product((32, 64) if quick else (16, 32, 64, 128), (2, 4) if quick else (2, 4, 8),
                             (4, 8) if quick else (2, 4, 8, 16))
    for block_n, warps, per_sm in grid:
        yield {"name": f"split n{block_n} w{warps} p{per_sm}", "block_n": block_n, "num_warps": warps,
               "programs_per_sm": per_sm}


def measure(head: dict, name: str, fn, ref: torch.Tensor, need: int) -> dict:
    """One candidate's record: its time per call in a graph, the bandwidth that is, its error."""
    try:
        err = (fn().double() - ref).abs().max().item()
        us = graph_time_us(fn)
        r = {**head, "candidate": name, "us": round(us, 2), "gb_s": round(need / us / 1e3, 1), "max_error": err}
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is reported, not fatal
        r = {**head, "candidate": name, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    print(json.dumps(r), flush=True)
    return r


def sweep_shape(rows: int, length: int, filled: int, quick: bool, gpu: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, mask = inputs(rows, length, filled)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask).transpose(1, 2)
    need = filled * 2 * HEADS * HEAD_DIM * 2 * rows  # bytes of the filled keys and values
    head = {"gpu": gpu, "rows": rows, "cache": length, "filled": filled, "kv_mb": round(need / 1e6, 2)}

    def sdpa(backend):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    results = [measure(head, "sdpa efficient", lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION), ref, need),
               measure(head, "sdpa math", lambda: sdpa(SDPBackend.MATH), ref, need)]
    for c in candidates(quick):
        kw = {key: val for key, val in c.items() if key != "name"}
        results.append(measure(head, c["name"], lambda kw=kw: da.split_attention(q, k, v, mask, **kw), ref, need))
    ok = [r for r in results if "us" in r and r["candidate"].startswith("split")]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    return {**head, "best": best and best["candidate"], "best_us": best and best["us"],
            "defaults_us": next((r["us"] for r in ok if r["candidate"] == "split (defaults)"), None),
            "sdpa_efficient_us": next((r.get("us") for r in results if r["candidate"] == "sdpa efficient"), None)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    a = ap.parse_args()
    if not torch.cuda.is_available() or not da.available():
        print("decode_attention_sweep.py needs a CUDA device and Triton", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_properties(0).name
    for rows, length, filled in SHAPES:
        print(json.dumps(sweep_shape(rows, length, filled, a.quick, gpu)), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
