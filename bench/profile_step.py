"""Where a training step's GPU time goes: torch.profiler over a few steps of the real engine (same setup
as train_bench.py), printed as the top kernels by CUDA time. Usage: python3 bench/profile_step.py ARGS
(the same arguments as train_bench.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_bench  # noqa: E402


def main():
    import torch
    from torch.profiler import ProfilerActivity, profile

    steps = []
    orig = train_bench.recipe.train_step

    def wrapped(run, k):
        if k == 3:
            prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
            prof.__enter__()
            steps.append(prof)
        out = orig(run, k)
        if k == 3:
            torch.cuda.synchronize()
            steps[0].__exit__(None, None, None)
            print(steps[0].key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        return out

    train_bench.recipe.train_step = wrapped
    sys.argv += ["--warmup", "3", "--steps", "1"]
    train_bench.main()


if __name__ == "__main__":
    main()
