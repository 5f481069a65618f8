"""What one installation of the fused path owns: its options, the cache of compute-dtype adapter copies and
the rotary kernel's first-use check. train/recipe.build_model makes one per model and hands it to both
installers (model/lora_fast.install_fast_lora, model/layers.install_layer_runners); the swap records they
put on module instances hold it. Nothing of it lives in a module or on a library object, so two models in
one process (a test suite, a benchmark beside a second model) never share a cache or a kernel verdict.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

from torch.optim.optimizer import register_optimizer_step_post_hook

NF4_DEQUANT = ("triton", "bitsandbytes")


@dataclass(frozen=True)
class EngineOptions:
    """Settings of the fused path that a caller may change (bench/train_bench.py's A/B flags); the defaults
    are what `codetune train` runs, and what `codetune plan` (plan/memory.py) predicts memory for."""

    # The MLP runs in row chunks when its widest activation (tokens x intermediate, bf16) would exceed this
    # (model/fast_layer.mlp_chunk_rows): at 16k tokens stable-code-3b's gate|up output alone is 453 MiB, and
    # backward needs it twice over. Chunks cost no FLOPs but CPU time per launch, and an 8k step is already
    # near CPU-bound. Measured on an H200 (bench/results/raw/s4b.*), stable-code-3b NF4 tok/s / GiB reserved:
    #   8k:  32 MiB 17,120 / 2.89   64 MiB 18,288 / 3.13   128 MiB (unchunked) ~19,300 / 3.64
    #   16k: 32 MiB 13,933 / 3.79   64 MiB 14,447 / 4.04   128 MiB 14,910 / 4.74 (call A, another H200)
    mlp_chunk_bytes: int = 64 * 2**20
    # NF4 weights: model/kernels/nf4.py's one-launch Triton kernel (checked against bitsandbytes at first use), or
    # "bitsandbytes" to force bitsandbytes' own path (the A/B in docs/performance.md).
    nf4_dequant: str = "triton"

    def __post_init__(self):
        if self.nf4_dequant not in NF4_DEQUANT:
            raise ValueError(f"nf4_dequant must be one of {', '.join(NF4_DEQUANT)}, not {self.nf4_dequant!r}")
        if self.mlp_chunk_bytes < 1:
            raise ValueError(f"mlp_chunk_bytes must be positive, not {self.mlp_chunk_bytes}")


@dataclass
class KernelCheck:
    """A kernel's comparison with the PyTorch ops it replaces, run at its first use: ok is None (not yet
    run), True (identical: the kernel from now on) or False (differs or failed: the PyTorch ops from now on,
    `detail` says why)."""
    ok: bool | None = None
    detail: str = "not run"

    def record(self, ok: bool, detail: str) -> None:
        self.ok, self.detail = ok, detail


class AdapterCasts:
    """The compute-dtype adapters (A_i concatenated, B_i) of the few most recently used fused nodes: a
    layer's backward reuses what its recompute just cast (4 fused nodes per layer), and each cast and
    concatenation is a kernel launch. Not every layer's: those copies (48 MiB on stable-code-3b) were
    measured alive at the step's peak.

    An entry is valid while its key holds: the dtype and every adapter's (`_version`, `data_ptr()`), which
    any in-place write through PyTorch bumps (a checkpoint load's copy_, a foreach or for-loop optimizer).
    Not enough alone: torch's fused AdamW (the CUDA default, train/optim.py) leaves version counters as they
    were (measured, torch 2.13), and bitsandbytes' 8-bit optimizers write through raw pointers; a cache
    keyed on versions alone served step 0's adapters for good (a loss curve that never moved). So every
    optimizer step of the process, through torch's global step hook, empties the cache as well: any
    torch.optim.Optimizer, wrapped by codetune or not. (A write through `.data` outside an optimizer step
    is still invisible: neither signal sees it.)"""

    KEPT = 8

    def __init__(self):
        self.entries: OrderedDict = OrderedDict()  # owner (a lora_fast.Projections) -> (key, value)
        ref = weakref.ref(self)

        def stepped(*_args) -> None:
            casts = ref()
            if casts is not None:
                casts.clear()

        # Weak, so a dropped model's cache (GPU tensors) goes with it; and never removed: a removal from a
        # finalizer could run inside torch's loop over these hooks (the garbage collector runs at any
        # allocation) and break that optimizer step. A dead one costs a call that does nothing.
        register_optimizer_step_post_hook(stepped)

    def get(self, owner, key, make):
        """The cached value of `owner` if it was made under `key`, else make() (then cached)."""
        hit = self.entries.get(owner)
        if hit is not None and hit[0] == key:
            self.entries.move_to_end(owner)
            return hit[1]
        val = make()
        self.entries[owner] = (key, val)
        self.entries.move_to_end(owner)
        if len(self.entries) > self.KEPT:
            self.entries.popitem(last=False)
        return val

    def clear(self) -> None:
        self.entries.clear()


class EngineState:
    """The state of one installation of the fused path (see the module docstring)."""

    def __init__(self, options: EngineOptions | None = None):
        self.options = options or EngineOptions()
        self.casts = AdapterCasts()
        self.rotary = KernelCheck()  # model/kernels/rotary_triton.py, checked once per installation
