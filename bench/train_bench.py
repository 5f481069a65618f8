"""codetune's training step on a random-init model of stable-code-3b's exact shape, measured the way the
peer scripts in ../shared/bench measure theirs (batch 1, random tokens, LoRA r=16 on all linear layers,
AdamW lr 1e-4, 5 warm-up + 10 timed steps, median). It drives the real engine: recipe.build_model and
recipe.train_step, the same code `codetune train` runs.

Usage: python3 bench/train_bench.py --quant nf4 --seq 4096 [--last-layers 8] [--max-vram 10GiB]
          --tokenizer ../shared/tokenizers/gpt-neox-20b.json
Prints one JSON line like the peers. `--loss-steps N` instead runs N steps on a fixed token stream and
prints the loss curve (for the parity check against the HF recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codetune.train.memory import configure_allocator  # noqa: E402

configure_allocator()

import torch  # noqa: E402

from codetune.config import build  # noqa: E402
from codetune.model.engine_state import NF4_DEQUANT, EngineOptions  # noqa: E402
from codetune.model.layers import graph_bank  # noqa: E402
from codetune.model.load import padded_vocab  # noqa: E402
from codetune.model.tokenizer import ensure_special_tokens  # noqa: E402
from codetune.train import recipe  # noqa: E402
from codetune.train.memory import PeakMeter  # noqa: E402


class _Acc:
    """The slice of accelerate.Accelerator that train_step uses, for one process."""
    num_processes = 1

    def __init__(self, mode):
        self.mode = mode

    def autocast(self):  # what Accelerate does for recipe.mixed_precision()
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.mode == "fp16")

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, norm):
        return torch.nn.utils.clip_grad_norm_(params, norm)


class _Stream:
    def __init__(self, batches):
        self.batches = batches

    def batch(self, k):
        return self.batches[k % len(self.batches)]


def make_batches(vocab: int, seq: int, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, seq), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        out.append({"input_ids": ids, "position_ids": torch.arange(seq)[None], "labels": labels})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stable-code-3b")
    ap.add_argument("--quant", choices=["nf4", "int8", "bf16", "fp32"], default="nf4")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096], help="one or more lengths (model loaded once)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--last-layers", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-vram", default=None)
    ap.add_argument("--offload", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--loss-steps", type=int, default=0, help="run N steps and print the loss curve instead")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-fast-lora", action="store_true")
    ap.add_argument("--no-fast-layers", action="store_true")
    ap.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--no-cpu-embeddings", action="store_true")
    ap.add_argument("--mlp-chunk-mib", type=int, default=None,
                    help="A/B of EngineOptions.mlp_chunk_bytes (model/engine_state.py; default: the engine's)")
    ap.add_argument("--nf4-dequant", choices=NF4_DEQUANT, default=EngineOptions.nf4_dequant,
                    help="A/B of EngineOptions.nf4_dequant: model/kernels/nf4.py's Triton kernel or bitsandbytes' own path")
    a = ap.parse_args()

    from transformers import PreTrainedTokenizerFast

    tok = ensure_special_tokens(PreTrainedTokenizerFast(tokenizer_file=a.tokenizer))
    flags = {"model.model": a.model, "model.random_init": True, "model.precision": a.quant,
             "adapter.rank": a.rank, "adapter.alpha": float(2 * a.rank),
             "adapter.train_layers": f"last:{a.last_layers}" if a.last_layers else "all",
             "data.seq_len": max(a.seq), "train.max_vram": a.max_vram, "train.lr": a.lr, "train.warmup_steps": 0,
             "train.schedule": "constant", "train.max_grad_norm": 0.0, "train.offload_activations": a.offload,
             "train.grad_checkpointing": not a.no_checkpointing, "train.steps": max(a.loss_steps, 1),
             "train.fast_lora": not a.no_fast_lora, "train.fast_layers": not a.no_fast_layers,
             "train.cuda_graphs": a.cuda_graphs, "train.cpu_embeddings": not a.no_cpu_embeddings}
    cfgs = build(["model", "adapter", "data", "train"], flags=flags)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from codetune.train.memory import cap_vram
    cap_vram(a.max_vram, device)
    model, offloader = recipe.build_model(cfgs, device, padded_vocab(tok), engine_options(a))
    from codetune.train.optim import build_optimizer, build_scheduler
    opt = build_optimizer(model, cfgs["train"], device)
    sched = build_scheduler(opt, cfgs["train"])
    vocab = model.get_input_embeddings().weight.shape[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    acc = _Acc(recipe.mixed_precision(device))
    if a.loss_steps:
        run = SimpleNamespace(cfgs=cfgs, peaks=PeakMeter(device), accelerator=acc, device=device, loss_fn=recipe.CausalLMLoss(model),
                              optimizer=opt, scheduler=sched,
                              train_stream=_Stream(make_batches(vocab, a.seq[0], a.loss_steps)))
        losses = [recipe.train_step(run, s)["loss"] for s in range(a.loss_steps)]
        print(json.dumps({"engine": "codetune", "quant": a.quant, "seq": a.seq[0], "losses": losses}), flush=True)
        return
    for seq in sorted(a.seq):  # ascending, so cached blocks of a shorter run never inflate a longer one's peak
        print(json.dumps(measure(a, seq, cfgs, acc, device, model, opt, sched, vocab, trainable)), flush=True)


def engine_options(a) -> EngineOptions:
    """The engine's options with this run's A/B flags applied (the defaults: what `codetune train` runs)."""
    chunk = {} if a.mlp_chunk_mib is None else {"mlp_chunk_bytes": a.mlp_chunk_mib * 2**20}
    return EngineOptions(nf4_dequant=a.nf4_dequant, **chunk)


def measure(a, seq, cfgs, acc, device, model, opt, sched, vocab, trainable) -> dict:
    run = SimpleNamespace(cfgs=cfgs, peaks=PeakMeter(device), accelerator=acc, device=device, loss_fn=recipe.CausalLMLoss(model),
                          optimizer=opt, scheduler=sched, train_stream=_Stream(make_batches(vocab, seq, 1)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t = time.perf_counter()
        recipe.train_step(run, i)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    res = {"engine": "codetune", "quant": a.quant, "seq": seq, "rank": a.rank, "last_layers": a.last_layers,
           "fast_lora": not a.no_fast_lora, "fast_layers": not a.no_fast_layers, "cuda_graphs": a.cuda_graphs, "offload": a.offload, "max_vram": a.max_vram,
           "cpu_embeddings": not a.no_cpu_embeddings, "mlp_chunk_mib": engine_options(a).mlp_chunk_bytes / 2**20,
           "trainable_params": trainable, "tokens_per_s": round(seq / step_s, 1)}
    if a.nf4_dequant != EngineOptions.nf4_dequant:  # (bench/report.py names the row after it)
        res["dequant"] = a.nf4_dequant
    bank = graph_bank(model)
    if bank is not None:
        from codetune.config import CUDA_GRAPHS_AUTO_MAX_TOKENS
        res.update(graphs_captured=bank.captured, graphs_failure=bank.failure, graphs_active=bank.active and bank.enabled,
                   graphs_auto_max_tokens=CUDA_GRAPHS_AUTO_MAX_TOKENS)
    res["kernels"] = kernel_report(model)
    if device.type == "cuda":  # (train_step resets the allocator's peak counters per step: PeakMeter)
        peaks = run.peaks.summary()
        res.update(peak_allocated_gib=peaks["train_peak_alloc_gib"], peak_reserved_gib=peaks["train_peak_reserved_gib"],
                   gpu=torch.cuda.get_device_name(0))
    return res


def kernel_report(model) -> dict:
    """Which of the fused path's checked kernels ran (an A/B that compares engines must compare like with
    like): the Triton rotary's first-use verdict and how many NF4 weights dequantize through Triton."""
    import gc

    from codetune.model.kernels.nf4 import Nf4Weight
    from codetune.model.layers import LayerRunner, decoder_layers

    runners = [r for r in (layer.__dict__.get("forward") for layer in decoder_layers(model)) if isinstance(r, LayerRunner)]
    fused = [r.fast for r in runners if r.fast is not None]
    nf4 = [o for o in gc.get_objects() if isinstance(o, Nf4Weight)]
    return {"rotary_triton": fused[0].rotary.check.ok if fused else None, "nf4_weights": len(nf4),
            "nf4_triton": sum(bool(o.use_triton) for o in nf4)}


if __name__ == "__main__":
    main()
