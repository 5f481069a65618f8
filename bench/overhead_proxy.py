"""Python/launch overhead of one training step, measured on the CPU: the real engine on a model with
stable-code-3b's 32 layers but hidden size 64 and 64 tokens, so compute is negligible and the step time
is almost all per-op and per-module overhead — the part that makes the 4k step CPU-bound on a GPU.
Not a benchmark of speed on a GPU; a cheap before/after for changes that remove ops or Python calls.

    python3 bench/overhead_proxy.py [--steps 20] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from codetune import registry  # noqa: E402
from codetune.config import build  # noqa: E402
from codetune.train import recipe  # noqa: E402
from codetune.train.memory import PeakMeter  # noqa: E402
from codetune.train.optim import build_optimizer, build_scheduler  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_bench import _Acc, _Stream, make_batches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-fast-lora", action="store_true")
    ap.add_argument("--no-fast-layers", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    registry.MODELS["proxy-32"] = registry.ModelSpec("proxy-32", None, dict(registry._TINY, num_hidden_layers=32))
    flags = {"model.model": "proxy-32", "model.random_init": True, "model.precision": "fp32",
             "adapter.rank": 16, "adapter.alpha": 32.0, "data.seq_len": a.seq, "train.lr": 1e-4,
             "train.warmup_steps": 0, "train.schedule": "constant", "train.max_grad_norm": 0.0,
             "train.steps": 1, "train.fast_lora": not a.no_fast_lora,
             "train.fast_layers": not a.no_fast_layers}
    cfgs = build(["model", "adapter", "data", "train"], flags=flags)
    device = torch.device("cpu")
    model, _ = recipe.build_model(cfgs, device, 4096)
    opt = build_optimizer(model, cfgs["train"], device)
    run = SimpleNamespace(cfgs=cfgs, peaks=PeakMeter(device), accelerator=_Acc("no"), device=device, loss_fn=recipe.CausalLMLoss(model),
                          optimizer=opt, scheduler=build_scheduler(opt, cfgs["train"]),
                          train_stream=_Stream(make_batches(4096, a.seq, 1)))
    for i in range(3):
        recipe.train_step(run, i)
    prof = cProfile.Profile() if a.profile else None
    times = []
    for i in range(a.steps):
        t = time.perf_counter()
        if prof:
            prof.enable()
        recipe.train_step(run, i)
        if prof:
            prof.disable()
        times.append(time.perf_counter() - t)
    print(f"median step {sorted(times)[len(times) // 2] * 1000:.1f} ms over {a.steps} steps")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
