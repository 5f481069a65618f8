"""GPU memory settings from the seed recipe, made real: allocator config, a VRAM cap that emulates a
smaller card, memory readings for the progress bar and summary, and an out-of-memory explanation."""

from __future__ import annotations

import contextlib
import os

import torch

from codetune.config import parse_size

DEFAULT_ALLOC_CONF = "expandable_segments:True"


def configure_allocator() -> str | None:
    """Must run before CUDA initialises. expandable_segments reserved ~10% less than the often-quoted
    max_split_size_mb:128 in our measurements (fewer, growable segments -> less fragmentation). A user's
    own PYTORCH_CUDA_ALLOC_CONF is respected. Returns the line worth printing — None without a CUDA
    device, where the setting does nothing and a line about CUDA is only noise."""
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if not current:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = DEFAULT_ALLOC_CONF
    # asked only after the variable is set: the allocator reads it at the first CUDA allocation
    if not torch.cuda.is_available():
        return None
    if current:
        return f"PYTORCH_CUDA_ALLOC_CONF={current} (yours, kept)"
    return f"PYTORCH_CUDA_ALLOC_CONF={DEFAULT_ALLOC_CONF} (codetune default)"


def cap_vram(max_vram: str | None, device: torch.device) -> int | None:
    """Limit this process's GPU memory, e.g. 10GiB on an 80 GB card to check a 10 GB card's fit."""
    cap = parse_size(max_vram)
    if not cap or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return cap


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def snapshot(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"alloc_gib": gib(torch.cuda.memory_allocated(device)), "reserved_gib": gib(torch.cuda.memory_reserved(device)),
            "peak_alloc_gib": gib(torch.cuda.max_memory_allocated(device)),
            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(device))}


class PeakMeter:
    """Peak GPU memory per phase of a run ("train" steps, "val" passes): the allocator's peak counters are
    reset as a phase starts and folded into that phase's running maximum as it ends, so a validation pass
    that grows the reserved pool shows as its own number instead of hiding inside the training peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if cuda:
            p = self.peaks.setdefault(name, {"alloc": 0, "reserved": 0})
            p["alloc"] = max(p["alloc"], torch.cuda.max_memory_allocated(self.device))
            p["reserved"] = max(p["reserved"], torch.cuda.max_memory_reserved(self.device))

    def summary(self) -> dict:
        """{train,val}_peak_{alloc,reserved}_gib of the phases seen so far, and peak_{alloc,reserved}_gib over
        all of them (the allocator's own peak counters only cover the phase in progress)."""
        out = {f"{name}_peak_{kind}_gib": gib(v) for name, p in self.peaks.items() for kind, v in p.items()}
        for kind in ("alloc", "reserved"):
            if self.peaks:
                out[f"peak_{kind}_gib"] = gib(max(p[kind] for p in self.peaks.values()))
        return out


def explain_oom(cfgs: dict, device: torch.device) -> str:
    data, train, model, adapter = cfgs["data"], cfgs["train"], cfgs["model"], cfgs["adapter"]
    peak = snapshot(device).get("peak_reserved_gib", "?")
    tips = []
    if train.batch_size > 1:
        tips.append(f"--batch-size {max(1, train.batch_size // 2)} --grad-accum {train.grad_accum * 2} (same tokens per step)")
    if train.cuda_graphs != "off":
        tips.append("--cuda-graphs off (graphs keep static buffers and persistent grads: ~0.2 GiB at 8k tokens)")
    if not train.cpu_embeddings:
        tips.append("--cpu-embeddings (the frozen input-embedding table in CPU RAM: -0.24 GiB on stable-code-3b)")
    if train.offload_activations != "on":
        tips.append("--offload-activations on (layer inputs live in CPU RAM)")
    if model.precision not in ("nf4",):
        tips.append("--precision nf4 (4-bit base weights)")
    if adapter.train_layers == "all":
        tips.append("--train-layers last:8 (the frozen prefix stores nothing)")
    tips.append(f"--seq-len {max(512, data.seq_len // 2)} (re-run prepare)")
    return (f"out of GPU memory while training {model.model} ({model.precision}) at seq_len={data.seq_len}, "
            f"batch_size={train.batch_size}; peak reserved {peak} GiB. Your last checkpoint is untouched. Try: "
            + "; or ".join(tips) + ". `codetune plan` predicts the fit before you run.")
