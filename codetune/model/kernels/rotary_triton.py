"""Partial rotary embedding of q and k in ONE Triton launch, in place on the fused q|k|v rows.

Why: the same rotation written with PyTorch ops is eight strided elementwise kernels (four muls, a sub,
an add, two copies) over 20 of each head's 80 dims, three times per layer and step (forward, recompute,
backward) — 768 launches and ~20 ms of a 4k step on an H100, for a few MB of data.

bf16 only. Rounding is PyTorch's, op for op (each product rounded to bf16 before the sum), so the
kernel and rotary.Rotary's PyTorch path give identical results (tests/gpu checks it; so does Rotary, at
its first use in each installation, before trusting it). Stateless: whether to use it is the caller's.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: rotary.Rotary's PyTorch path
    triton = None

if triton is not None:

    @triton.jit
    def _bf16(x):
        """fp32 -> nearest-even bf16 value, kept in fp32. Done on the bits: Triton was measured folding a
        plain .to(bf16).to(fp32) round trip away, leaving products unrounded (1-ulp differences)."""
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _rotary_kernel(y_ptr, cos_ptr, sin_ptr, y_stride, seq, cs_bstride, cs_sstride, n_heads,
                       HD: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
                       INVERSE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cs = (row // seq) * cs_bstride + (row % seq) * cs_sstride
        d = tl.arange(0, BD)
        dm = d < HALF
        c1 = tl.load(cos_ptr + cs + d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + cs + HALF + d, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + cs + d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + cs + HALF + d, mask=dm, other=0.0).to(tl.float32)
        h = tl.arange(0, BH)
        m = (h < n_heads)[:, None] & dm[None, :]
        ptr = y_ptr + row * y_stride + h[:, None] * HD + d[None, :]
        x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=m, other=0.0).to(tl.float32)
        # every product rounded to bf16 first, as PyTorch's separate mul kernels do (bf16 x bf16 is exact
        # in fp32, so the only roundings are these and the final one)
        if INVERSE:  # transpose of [[c1, -s1], [s2, c2]] (the backward)
            n1 = _bf16(x1 * c1[None, :]) + _bf16(x2 * s2[None, :])
            n2 = _bf16(x2 * c2[None, :]) - _bf16(x1 * s1[None, :])
        else:
            n1 = _bf16(x1 * c1[None, :]) - _bf16(x2 * s1[None, :])
            n2 = _bf16(x2 * c2[None, :]) + _bf16(x1 * s2[None, :])
        tl.store(ptr, _bf16(n1).to(tl.bfloat16), mask=m)
        tl.store(ptr + HALF, _bf16(n2).to(tl.bfloat16), mask=m)


def rotary_triton(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int, n_heads: int,
                  head_dim: int, half: int, inverse: bool) -> bool:
    """Rotate the first 2*half dims of the first n_heads heads of every row of y (batch*seq, cols) in
    place. Returns False (nothing done) where the kernel doesn't apply, so the caller runs PyTorch ops;
    a Triton/driver error propagates (rotary.Rotary then turns the kernel off for its installation)."""
    if triton is None or y.stride(1) != 1 or cos.stride(-1) != 1:
        return False
    if sin.stride() != cos.stride():
        return False
    if cos.dtype != y.dtype or sin.dtype != y.dtype or y.dtype != torch.bfloat16:
        return False  # (fp16 compute, pre-Ampere GPUs: the PyTorch ops)
    seq = y.shape[0] // batch
    cs_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rotary_kernel[(y.shape[0],)](y, cos, sin, y.stride(0), seq, cs_b, cos.stride(1), n_heads, HD=head_dim,
                                  HALF=half, BH=triton.next_power_of_2(n_heads),
                                  BD=triton.next_power_of_2(half), INVERSE=inverse)
    return True
