"""Where a training step's GPU time goes: torch.profiler over one step of the real engine (same setup
as train_bench.py). Prints the step's wall time, the summed kernel time, the top ops by CUDA time, and
the elementwise/copy ops grouped by input shape (to find which tensor each one touches).
Usage: python3 bench/profile_step.py ARGS (the same arguments as train_bench.py)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_bench  # noqa: E402


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    orig = train_bench.recipe.train_step
    walls = []

    def wrapped(run, k):
        torch.cuda.synchronize()
        t = time.perf_counter()
        if k != 3:
            out = orig(run, k)
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t) * 1e3)
            return out
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
            out = orig(run, k)
            torch.cuda.synchronize()
        ev = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in ev) / 1e3
        print(f"unprofiled step wall times (ms): {[round(w, 1) for w in walls]}; profiled step kernel sum {gpu:.1f} ms")
        print(ev.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70))
        shaped = prof.key_averages(group_by_input_shape=True)
        keep = [e for e in shaped if e.key in ("aten::mul", "aten::copy_", "aten::add", "aten::add_", "aten::mul_",
                                                "aten::cat", "aten::zeros", "aten::fill_", "aten::sub", "aten::clone")]
        keep.sort(key=lambda e: -e.self_device_time_total)
        for e in keep[:30]:
            print(f"{e.key:14s} {e.count:5d} calls {e.self_device_time_total / 1e3:8.2f} ms  {str(e.input_shapes)[:150]}")
        return out

    train_bench.recipe.train_step = wrapped
    sys.argv += ["--warmup", "5", "--steps", "1"]
    train_bench.main()


if __name__ == "__main__":
    main()
