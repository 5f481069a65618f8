"""What is alive at the peak of a training step: records the caching allocator's history over one timed
step of the real engine (after the warm-up steps; same arguments as train_bench.py), replays it to the
moment allocated memory peaks, and groups the blocks alive then by the code line that made them.

Blocks allocated before the recorded step (weights, adapters, optimizer state, pinned buffers' GPU
copies) show as one `before the step` figure. CUDA-graph replays allocate nothing (their memory is the
private pool, bench/memory_snapshot.py), so run this with --cuda-graphs off to see a graphed step's
working set, or record the capture step (--record-step 2: each graph's working set is allocated then).
Usage (GPU): python3 bench/memory_peak.py --tokenizer tok.json --quant nf4 --seq 8192 [--record-step N]
Prints one JSON line.
"""

import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_bench  # noqa: E402

OURS = ("codetune/", "transformers/", "peft/", "bitsandbytes/")


def where(frames: list[dict]) -> str:
    """The innermost frame in codetune/transformers/peft/bitsandbytes code (else the innermost Python)."""
    for f in frames:
        if any(k in f["filename"] for k in OURS):
            path = f["filename"]
            for k in OURS:
                if k in path:
                    path = k + path.split(k, 1)[1]
                    break
            return f"{path}:{f['line']} {f['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def live_at_peak(trace: list[dict], base: int, reserved_base: int = 0) -> dict:
    """Replay alloc/free events from `base` allocated bytes; the blocks alive when the total peaked.
    Also follows reserved memory (segment events) from `reserved_base`."""
    live: dict[int, dict] = {}
    cur = peak = base
    res = res_peak = reserved_base
    at_peak: dict[int, dict] = {}
    peak_event = res_event = None
    big: list[tuple[int, str]] = []  # the largest single allocations of the step
    for ev in trace:
        act = ev["action"]
        if act == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            big.append((ev["size"], where(ev.get("frames", []))))
            if cur > peak:
                peak, at_peak, peak_event = cur, dict(live), ev
        elif act == "free_completed":
            cur -= ev["size"]
            live.pop(ev["addr"], None)
        elif act in ("segment_alloc", "segment_map"):
            res += ev["size"]
            if res > res_peak:
                res_peak, res_event = res, ev
        elif act in ("segment_free", "segment_unmap"):
            res -= ev["size"]
    groups = defaultdict(lambda: [0, 0])
    for ev in at_peak.values():
        g = groups[where(ev.get("frames", []))]
        g[0] += ev["size"]
        g[1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])
    mib = lambda n: round(n / 2**20, 1)  # noqa: E731
    big.sort(key=lambda t: -t[0])
    return {"before_step_mib": mib(base), "peak_mib": mib(peak),
            "reserved_before_step_mib": mib(reserved_base), "reserved_peak_mib": mib(res_peak),
            "reserved_peak_made_by": where(res_event.get("frames", [])) if res_event else None,
            "largest_allocations": [{"mib": mib(n), "where": w} for n, w in big[:12]],
            "step_alive_at_peak_mib": mib(sum(e["size"] for e in at_peak.values())),
            "peak_made_by": where(peak_event.get("frames", [])) if peak_event else None,
            "peak_stack": [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
                           for f in (peak_event or {}).get("frames", [])
                           if any(k in f["filename"] for k in OURS)][:12],
            "alive_at_peak": [{"where": k, "mib": mib(v[0]), "blocks": v[1]} for k, v in top[:30]]}


def main():
    import torch

    from codetune.train import recipe

    record_step = 0  # which step to record (1 = the first, eager; 2 = the graphs' captures); default: after warm-up
    if "--record-step" in sys.argv:  # (ours; the rest of argv is train_bench.py's)
        k = sys.argv.index("--record-step")
        record_step = int(sys.argv[k + 1])
        del sys.argv[k:k + 2]
    orig_step, orig_measure = recipe.train_step, train_bench.measure
    state = {"calls": 0, "result": None}

    def train_step(run, i):
        state["calls"] += 1
        if state["calls"] != state["record_at"]:
            return orig_step(run, i)
        torch.cuda.synchronize()
        base, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        out = orig_step(run, i)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        state["result"] = live_at_peak(snap["device_traces"][0], base, reserved)
        return out

    def measure(a, *args, **kwargs):
        state["calls"], state["record_at"] = 0, record_step or a.warmup + 1
        res = orig_measure(a, *args, **kwargs)
        res["memory_at_peak"] = state["result"]
        return res

    recipe.train_step, train_bench.measure = train_step, measure
    train_bench.main()


if __name__ == "__main__":
    main()
