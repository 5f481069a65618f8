"""The fused LoRA node: one autograd node for one or several frozen linears that read the same input, each
with an optional LoRA adapter, followed by an optional epilogue (see `_Fused`; why: model/lora_fast.py).

Free of transformers and PEFT (tests/model/test_kernels.py checks): the frozen part comes in as a
`Projections`-like object (model/lora_fast.Projections: `weight(dtype, device)`, `adapters(...)`, `bias(dtype)`,
`sizes`, `offsets`), the adapters as plain tensors (`LoraParts`).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, NamedTuple

import torch

from codetune.model.kernels.rotary import RotaryInputs
from codetune.model.kernels.swiglu import swiglu_backward, swiglu_forward

if TYPE_CHECKING:  # (the type only: nothing of lora_fast is imported here)
    from codetune.model.lora_fast import Projections


class LoraParts(NamedTuple):
    """One projection of a fused node: its frozen base layer and, when it has one, its LoRA adapter."""
    base: torch.nn.Module
    A: torch.Tensor | None      # (r, in), PEFT's own parameter
    B: torch.Tensor | None      # (out, r)
    scale: float                # alpha / r


def holding(projections) -> ExitStack:
    """Projections.holding() of several at once."""
    stack = ExitStack()
    for p in projections:
        stack.enter_context(p.holding())
    return stack


class FusedSpec(NamedTuple):
    """What a fused node computes, besides its tensor inputs."""
    proj: Projections                 # (see the module docstring)
    scales: list[float]               # per projection: its adapter's alpha / r (1.0 without one)
    dtype: torch.dtype                # the compute dtype
    epilogue: str                     # "none" | "rotary" | "swiglu" | "unused" (see _Fused)
    rotary: RotaryInputs | None       # with epilogue "rotary"


class _Fused(torch.autograd.Function):
    """x -> outputs; args after `spec` (a FusedSpec): A_1, B_1, ..., A_n, B_n (None where a projection has
    no adapter).

    Epilogue "unused": the caller will never read the output's values, only back-propagate through it
    (the last projection of a layer recomputed for its backward: the recomputed layer output is thrown
    away). Then the base matmul is skipped and the output is left uninitialised; x and x A^T are still
    saved, so the backward is exactly the ordinary one."""

    @staticmethod
    def forward(ctx, x, spec, *ab):
        proj, scales, dtype, epi = spec.proj, spec.scales, spec.dtype, spec.epilogue
        in_dtype, shape = x.dtype, x.shape
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            unused = epi == "unused"
            if unused:  # only the graph is wanted (see the class docstring): no matmul, no values
                y = torch.empty(x2.shape[0], sum(proj.sizes), dtype=dtype, device=x.device)
            else:
                w = proj.weight(dtype, x.device)
                y = x2 @ w.t()
                del w
                bias = proj.bias(dtype)
                if bias is not None:
                    y += bias
            As, Bs = ab[0::2], ab[1::2]
            lora = [i for i, a in enumerate(As) if a is not None]
            xa = None
            if lora:
                a_cat, b_list = proj.adapters(As, Bs, lora, dtype)
                xa = x2 @ a_cat.t()  # every adapter's x A_i^T in one matmul (backward needs it)
                r0 = 0
                for j, i in enumerate(lora):
                    r, c = As[i].shape[0], proj.offsets[i]
                    if not unused:
                        y[:, c:c + proj.sizes[i]].addmm_(xa[:, r0:r0 + r], b_list[j].t(), alpha=scales[i])
                    r0 += r
            if epi == "rotary":
                rot = spec.rotary
                rot.rotary.apply_(y, rot.cos, rot.sin, shape[0])
                outs = [o.view(*shape[:-1], o.shape[-1]) for o in y.split(proj.sizes, dim=1)]
            elif epi == "swiglu":
                outs = [swiglu_forward(y, proj.sizes[0]).view(*shape[:-1], proj.sizes[0])]
            else:
                outs = [y.view(*shape[:-1], y.shape[-1])]
        ctx.save_for_backward(x2, xa, *ab, y if epi == "swiglu" else None)
        ctx.spec, ctx.lora, ctx.in_dtype, ctx.shape = spec, lora, in_dtype, shape
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        spec = ctx.spec
        proj, scales, dtype, epi = spec.proj, spec.scales, spec.dtype, spec.epilogue
        x2, xa, *ab, y = ctx.saved_tensors
        As, Bs = ab[0::2], ab[1::2]
        n_rows = x2.shape[0]
        with torch.autocast(x2.device.type, enabled=False):
            # the output gradient as column blocks [(tensor, first column)], never concatenated
            if epi == "swiglu":
                # dg|du are written over the saved gate|up output, which nothing reads after this
                blocks = [(swiglu_backward(y, grads[0].reshape(n_rows, -1).to(dtype), proj.sizes[0], out=y), 0)]
            else:
                blocks = [(torch.zeros(n_rows, n, dtype=dtype, device=x2.device) if d is None
                           else d.reshape(n_rows, n).to(dtype), c)
                          for d, n, c in zip(grads, proj.sizes, proj.offsets)]
                if epi == "rotary":
                    # in place on dq and dk: each is attention's own gradient buffer, read by nothing else
                    rot = spec.rotary
                    blocks[:2] = [(t if t.stride(1) == 1 else t.contiguous(), c) for t, c in blocks[:2]]
                    rot.rotary.apply_qk_(blocks[0][0], blocks[1][0], rot.cos, rot.sin, ctx.shape[0], inverse=True)

            def dy_of(i: int) -> torch.Tensor:  # projection i's columns of the output gradient
                c = proj.offsets[i]
                for blk, c0 in blocks:
                    if c0 <= c < c0 + blk.shape[1]:
                        return blk[:, c - c0:c - c0 + proj.sizes[i]]
                raise AssertionError(c)

            dx = None
            lora = ctx.lora
            if lora:
                a_cat, b_list = proj.adapters(As, Bs, lora, dtype)
                dyb = [dy_of(i) @ b_list[j] for j, i in enumerate(lora)]
                dyb = dyb[0] if len(dyb) == 1 else torch.cat(dyb, dim=1)
                svec = [scales[i] for i in lora for _ in range(As[i].shape[0])]
                # the scale s goes into the rank-r factors once (s = alpha/r is a power of two by default)
                s_t = svec[0] if len(set(svec)) == 1 else torch.tensor(svec, dtype=dtype, device=dyb.device)
                sdyb, sxa = dyb * s_t, xa * s_t
            if ctx.needs_input_grad[0]:
                w = proj.weight(dtype, x2.device)
                for blk, c0 in blocks:  # dx = sum over blocks of dy_block @ W_block
                    wb = w[c0:c0 + blk.shape[1]]
                    dx = blk @ wb if dx is None else dx.addmm_(blk, wb)
                del w
                if lora:
                    dx.addmm_(sdyb, a_cat)
                dx = dx.view(ctx.shape).to(ctx.in_dtype)
            out = [None] * (2 * len(As))
            if lora:
                dA = sdyb.t() @ x2  # (sum r, in): every adapter's A gradient in one matmul
                r0 = 0
                for i in lora:
                    r = As[i].shape[0]
                    if ctx.needs_input_grad[2 + 2 * i]:
                        out[2 * i] = dA[r0:r0 + r].to(As[i].dtype)
                    if ctx.needs_input_grad[3 + 2 * i]:
                        out[2 * i + 1] = (dy_of(i).t() @ sxa[:, r0:r0 + r]).to(Bs[i].dtype)
                    r0 += r
        return (dx, None, *out)


def fused(x: torch.Tensor, proj: Projections, parts: list[LoraParts], dtype: torch.dtype, epilogue: str = "none",
          rotary: RotaryInputs | None = None):
    """Run the fused node; parts[i] = lora_parts(...) of projection i."""
    ab = []
    for p in parts:
        ab += [p.A, p.B]
    return _Fused.apply(x, FusedSpec(proj, [p.scale for p in parts], dtype, epilogue, rotary), *ab)


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """autocast's dtype when it is on (fp16 GPUs), else the activations' own (bf16, or fp32)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


