"""One autograd function for a LoRA linear layer over a frozen base weight (bf16, NF4 or int8):

    y = x W^T + s (x A^T) B^T

Why not PEFT's forward: PEFT runs the base layer (bitsandbytes' own autograd function), clones its
output, casts the input to fp32 for the adapter, and runs two more autograd nodes — each a kernel
launch and a saved tensor. Here the quantized weight is dequantized straight to the compute dtype,
the adapter is added in place with one addmm, and backward needs only x and the rank-r product xA^T
(the base weight is dequantized again instead of stored: it's 2-3x smaller than x at 4k tokens and
free to rebuild). The adapter tensors stay PEFT's own parameters, so saving/loading is unchanged.

Used only where it is exact: one active adapter, no dropout, no DoRA, not merged. Anything else
keeps PEFT's forward.
"""

from __future__ import annotations

import torch


def weight_source(base: torch.nn.Module):
    """A function dtype -> the base layer's weight as a dense (out, in) tensor."""
    if type(base.weight).__name__ == "Params4bit":
        from codetune.model.nf4 import Nf4Weight

        return Nf4Weight(base.weight)
    return lambda dtype: dequantized_weight(base, dtype)


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


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wfn, bias, A, B, scale, dtype):
        in_dtype = x.dtype
        x = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            w = wfn(dtype)
            x2 = x.reshape(-1, x.shape[-1])
            xa = x2 @ A.to(dtype).t()
            y = torch.addmm(x2 @ w.t(), xa, B.to(dtype).t(), alpha=scale)
            del w
            if bias is not None:
                y += bias.to(dtype)
        ctx.save_for_backward(x2, xa, A, B)
        ctx.wfn, ctx.scale, ctx.dtype, ctx.in_dtype, ctx.shape = wfn, scale, dtype, in_dtype, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scale
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        with torch.autocast(dy.device.type, enabled=False):
            dx = dA = dB = None
            Bc = B.to(dtype)
            dyb = dy2 @ Bc  # (N, r)
            if ctx.needs_input_grad[0]:
                w = ctx.wfn(dtype)
                dx = torch.addmm(dy2 @ w, dyb, A.to(dtype), alpha=s)
                del w
                dx = dx.view(ctx.shape).to(ctx.in_dtype)
            if ctx.needs_input_grad[3]:
                dA = (dyb.t() @ x2).mul_(s).to(A.dtype)
            if ctx.needs_input_grad[4]:
                dB = (dy2.t() @ xa).mul_(s).to(B.dtype)
        return dx, None, None, dA, dB, None, None


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

    def __init__(self, module):
        self.m = module
        self.original = type(module).forward.__get__(module)
        self.weight = weight_source(module.base_layer)

    def __call__(self, x, *args, **kwargs):
        m = self.m
        if args or kwargs or getattr(m, "disable_adapters", False) or not _fast_eligible(m):
            return self.original(x, *args, **kwargs)
        name = m.active_adapters[0]
        # the compute dtype: autocast's when it is on (fp16 GPUs), else the activations' own (bf16, or fp32
        # when the user asked for fp32 weights)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return _LoRALinear.apply(x, self.weight, m.base_layer.bias, m.lora_A[name].weight,
                                 m.lora_B[name].weight, float(m.scaling[name]), dtype)


def install_fast_lora(model) -> int:
    """Swap the forward of every eligible PEFT LoRA linear; returns how many were swapped."""
    n = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling"):
            if isinstance(module.__dict__.get("forward"), FastLoRAForward):
                continue
            if not _fast_eligible(module):
                continue
            module.forward = FastLoRAForward(module)
            n += 1
    return n


def uninstall_fast_lora(model) -> None:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FastLoRAForward):
            del module.forward
