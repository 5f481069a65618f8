"""Where the reserved memory of a training step sits: the caching allocator's segments after the timed
steps of the real engine (what stays reserved; same arguments as train_bench.py), summed per memory pool — the ordinary pool
versus the CUDA graphs' private pool (model/graphs.py) — with their allocated and free bytes.
Usage (GPU): python3 bench/memory_snapshot.py --tokenizer tok.json --quant nf4 --seq 4096 [--cuda-graphs off]
Prints one JSON line."""

import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_bench  # noqa: E402


def summarize(snapshot: dict) -> dict:
    pools = defaultdict(lambda: {"segments": 0, "reserved": 0, "allocated": 0, "largest_free_block": 0})
    for seg in snapshot["segments"]:
        key = str(tuple(seg.get("segment_pool_id", (0, 0))))
        p = pools["ordinary" if key == "(0, 0)" else f"private {key}"]
        p["segments"] += 1
        p["reserved"] += seg["total_size"]
        p["allocated"] += seg["allocated_size"]
        for b in seg["blocks"]:
            if b["state"] == "inactive":
                p["largest_free_block"] = max(p["largest_free_block"], b["size"])
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    return {k: {kk: (gib(vv) if kk != "segments" else vv) for kk, vv in v.items()} for k, v in pools.items()}


def main():
    import torch

    orig = train_bench.measure

    def measure(*args, **kwargs):
        res = orig(*args, **kwargs)
        torch.cuda.synchronize()
        res["pools"] = summarize(torch.cuda.memory._snapshot())
        return res

    train_bench.measure = measure
    train_bench.main()


if __name__ == "__main__":
    main()
