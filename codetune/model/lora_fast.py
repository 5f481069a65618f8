"""The fused LoRA linear: PEFT's LoRA layers run through one autograd node (model/kernels/fused_lora.py)
for one or several frozen linears (bf16, NF4 or int8) that read the same input,
each with an optional LoRA adapter, followed by an optional epilogue:

    y = x [W_1; ...; W_n]^T + [s_i (x A_i^T) B_i^T]_i          then  none | rotary(q, k) | silu(g) * u

Why not PEFT's forward: PEFT runs the base layer (bitsandbytes' own autograd function), clones its
output, casts the input to fp32 for the adapter, and runs two more autograd nodes — each a kernel
launch and a saved tensor. Here the quantized weights are dequantized straight to the compute dtype
into one concatenated matrix (q/k/v: one matmul instead of three; gate/up: one instead of two), the
adapters are added in place, and backward needs only x and the rank-r products x A_i^T (the base
weights are dequantized again instead of stored: they are 2-3x smaller than x at 4k tokens and free
to rebuild). The 4k training step was measured CPU-bound on launches and Python calls, which is why
the epilogues (partial rotary embedding of q and k, SwiGLU) live in the same node.

This module is the PEFT- and weight-format-facing half: `Projections` (the frozen weights of a node, their
dequantization and the adapter cast cache), `lora_parts` (which PEFT layers qualify) and the forward swap.

The adapter tensors stay PEFT's own parameters, so saving/loading is unchanged. Used only where it is
exact: one active adapter, no dropout, no DoRA, not merged. Anything else keeps PEFT's forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from codetune.model.engine_state import EngineState
from codetune.model.kernels.fused_lora import LoraParts, compute_dtype_of, fused


def weight_source(base: torch.nn.Module, nf4_kernel: bool = True):
    """A function (dtype, out=None) -> the base layer's weight as a dense (out, in) tensor. nf4_kernel=False:
    NF4 weights through bitsandbytes' own dequantization (EngineOptions.nf4_dequant)."""
    if type(base.weight).__name__ == "Params4bit":
        from codetune.model.kernels.nf4 import Nf4Weight

        return Nf4Weight(base.weight, kernel=nf4_kernel)

    def dense(dtype, out=None):
        w = dequantized_weight(base, dtype)
        return w if out is None else out.copy_(w)
    return dense


def dequantized_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor in `dtype` (int8 and plain weights)."""
    w = base.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(dtype)
    if kind == "Int8Params":
        # LLM.int8 keeps int8 rows and one fp32 scale per output row (absmax / 127)
        scb = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB
        return w.data.to(dtype) * (scb.to(dtype) / 127.0).unsqueeze(1)
    return w.to(dtype)


class Projections:
    """The frozen part of a fused node: n weight sources, their output sizes and (frozen) biases, and the
    installation's state (engine_state.EngineState: the adapter cast cache, the NF4 dequant choice)."""

    def __init__(self, bases: list[torch.nn.Module], state: EngineState | None = None):
        self.bases = bases
        self.state = state or EngineState()
        self.sources = [weight_source(b, self.state.options.nf4_dequant == "triton") for b in bases]
        self.sizes = [int(b.out_features) for b in bases]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # first column of each output
        self.in_features = int(bases[0].in_features)
        self.held: tuple | bool | None = None  # see holding()
        self._bias: dict[torch.dtype, torch.Tensor | None] = {}

    def weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if isinstance(self.held, tuple) and self.held[0] == dtype:
            return self.held[1]
        if len(self.sources) == 1:
            w = self.sources[0](dtype)
        else:
            w = torch.empty(sum(self.sizes), self.in_features, dtype=dtype, device=device)
            for src, row, n in zip(self.sources, self.offsets, self.sizes):
                src(dtype, out=w[row:row + n])  # row blocks of a contiguous matrix are contiguous
        if self.held is False:  # holding, first use: keep it
            self.held = (dtype, w)
        return w

    @contextmanager
    def holding(self):
        """Keep the dequantized weight between calls inside this block (the MLP's sequence chunks use the
        same weights once per chunk: one dequantization instead of one per chunk)."""
        self.held = False
        try:
            yield
        finally:
            self.held = None

    def adapters(self, As, Bs, lora: list[int], dtype: torch.dtype):
        """(concatenated A_i, [B_i]) of the adapted projections in the compute dtype. Cached until an
        optimizer step or an in-place write changes a tensor (engine_state.AdapterCasts says how it
        knows) — each cast and the concatenation is a kernel launch, and the node runs three times per
        step (forward, recompute, backward)."""
        if As[lora[0]].is_cuda and torch.cuda.is_current_stream_capturing():
            # inside a CUDA graph (model/graphs.py) the casts are part of the graph, so every replay
            # reads the parameters' current values; a cached copy would be frozen into it
            return self._cast(As, Bs, lora, dtype)
        key = (dtype,) + tuple((As[i]._version, As[i].data_ptr(), Bs[i]._version, Bs[i].data_ptr()) for i in lora)
        return self.state.casts.get(self, key, lambda: self._cast(As, Bs, lora, dtype))

    @staticmethod
    def _cast(As, Bs, lora: list[int], dtype: torch.dtype):
        a = torch.cat([As[i] for i in lora]) if len(lora) > 1 else As[lora[0]]
        return a.to(dtype), [Bs[i].to(dtype) for i in lora]

    def bias(self, dtype: torch.dtype):
        """The concatenated biases in `dtype` (None without any), built once: lora_parts only admits
        frozen biases."""
        if dtype not in self._bias:
            bs = [b.bias for b in self.bases]
            self._bias[dtype] = None if all(b is None for b in bs) else torch.cat(
                [(b if b is not None else torch.zeros(n, device=self.bases[0].weight.device)).to(dtype)
                 for b, n in zip(bs, self.sizes)])
        return self._bias[dtype]


def lora_parts(module) -> LoraParts | None:
    """The LoraParts of a PEFT LoRA linear on the fast path (A, B None for a frozen plain linear); None when
    the fast path would not be exact."""
    if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
        if getattr(module, "disable_adapters", False) or not _fast_eligible(module):
            return None
        name = module.active_adapters[0]
        base = module.base_layer
        parts = LoraParts(base, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))
    elif hasattr(module, "weight") and hasattr(module, "in_features") and not hasattr(module, "lora_A"):
        base = module
        parts = LoraParts(module, None, None, 1.0)
    else:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None  # fully trained weights take the ordinary autograd path
    if hasattr(base, "_hf_hook"):  # weights streamed in by Accelerate's offload hooks
        return None
    return parts


def _fast_eligible(module) -> bool:
    active = getattr(module, "active_adapters", None)
    if not active or len(active) != 1 or getattr(module, "merged", False):
        return False
    name = active[0]
    if name not in module.lora_A or module.use_dora.get(name, False):
        return False
    drop = module.lora_dropout[name]
    return isinstance(drop, torch.nn.Identity) or getattr(drop, "p", 1.0) == 0.0


class FastLoRAForward:
    """Replaces one PEFT LoRA layer's forward (instance attribute). Falls back to PEFT's own forward
    whenever the fast path would not be exact (adapter disabled/merged, several adapters, dropout)."""

    def __init__(self, module, state: EngineState):
        self.m = module
        self.original = type(module).forward.__get__(module)
        self.proj = Projections([module.base_layer], state)

    def __call__(self, x, *args, **kwargs):
        parts = None if (args or kwargs) else lora_parts(self.m)
        if parts is None:
            return self.original(x, *args, **kwargs)
        return fused(x, self.proj, [parts], compute_dtype_of(x))


def install_fast_lora(model, state: EngineState | None = None) -> int:
    """Swap the forward of every eligible PEFT LoRA linear; returns how many were swapped. `state`: the
    installation's (train/recipe.build_model shares one with install_layer_runners); a new one if None."""
    state = state or EngineState()
    n = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling"):
            if isinstance(module.__dict__.get("forward"), FastLoRAForward):
                continue
            if not _fast_eligible(module):
                continue
            module.forward = FastLoRAForward(module, state)
            n += 1
    return n


def uninstall_fast_lora(model) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FastLoRAForward):
            del module.forward
