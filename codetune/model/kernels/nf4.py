"""NF4 (bitsandbytes, double-quantized) weight -> dense bf16/fp16 in ONE kernel launch.

bitsandbytes' own path is three launches and a dozen Python calls per weight (dequantize the 8-bit
block scales, add their offset, cast, then dequantize the 4-bit values). A training step dequantizes
every linear weight three times (forward, recomputed forward, backward) — 672 times for stable-code-3b
— and at 4k tokens the step was measured CPU-bound, so launches matter. This kernel reads the packed
nibbles, the 8-bit block scales and their fp32 second-level scales, and writes the dense weight.

Layout (bitsandbytes 0.4x-0.5x): element i of the flattened (out, in) weight is nibble i of the packed
bytes (high nibble first); its scale is absmax[i // blocksize]; with double quantization
absmax[j] = code2[absmax_u8[j]] * absmax2[j // blocksize2] + offset.

A GPU without Triton, or a layout this kernel doesn't cover, falls back to bitsandbytes; the first
use of each weight is checked against bitsandbytes (`Nf4Weight.verify`). `kernel=False` forces bitsandbytes'
path: engine_state.EngineOptions.nf4_dequant = "bitsandbytes" (bench/train_bench.py --nf4-dequant, for an
A/B in one device call: docs/performance.md).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the bitsandbytes path is used
    triton = None

if triton is not None:

    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absq_ptr, abs2_ptr, code2_ptr, code_ptr, offset, out_ptr, n_bytes, n_elems,
                            BLOCK: tl.constexpr, QBS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        first = offs * 2
        blk = first // QBS
        if NESTED:
            q = tl.load(absq_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(abs2_ptr + blk // BS2, mask=mask,
                                                                             other=0.0) + offset
        else:
            scale = tl.load(absq_ptr + blk, mask=mask, other=0.0)
        hi = tl.load(code_ptr + ((b >> 4) & 15), mask=mask, other=0.0) * scale
        lo = tl.load(code_ptr + (b & 15), mask=mask, other=0.0) * scale
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + first, hi.to(ty), mask=mask)
        tl.store(out_ptr + first + 1, lo.to(ty), mask=mask & (first + 1 < n_elems))


class Nf4Weight:
    """Dequantizer for one bitsandbytes Params4bit; `__call__(dtype)` returns the dense (out, in) weight.
    kernel=False: always bitsandbytes' own dequantization."""

    def __init__(self, param, kernel: bool = True):
        self.param = param
        qs = param.quant_state
        self.shape, self.qs = tuple(qs.shape), qs
        self.use_triton = (kernel and triton is not None and param.data.is_cuda and qs.quant_type == "nf4"
                           and qs.blocksize % 2 == 0 and (not qs.nested or qs.state2.blocksize > 0))
        self.offset = float(qs.offset) if qs.nested else 0.0  # read once: a .item() per call would sync
        self.verified = False
        self.check = "not run"

    def _triton(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        qs, packed = self.qs, self.param.data
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=packed.device)
        n_bytes = packed.numel()
        nested = bool(qs.nested)
        grid = (triton.cdiv(n_bytes, 1024),)
        _nf4_dequant_kernel[grid](
            packed, qs.absmax, qs.state2.absmax if nested else qs.absmax, qs.state2.code if nested else qs.code,
            qs.code, self.offset, out, n_bytes, out.numel(),
            BLOCK=1024, QBS=qs.blocksize, BS2=qs.state2.blocksize if nested else 1, NESTED=nested)
        return out

    def _bnb(self, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.param.data, self.qs).to(dtype)

    def verify(self, dtype: torch.dtype) -> None:
        """Compare once with bitsandbytes; beyond rounding (the kernel may fuse scale * code + offset into
        one FMA, moving a value by one bf16 ulp), use bitsandbytes for good and say why."""
        self.verified = True
        if not self.use_triton:
            return
        try:
            ours, ref = self._triton(dtype).float(), self._bnb(dtype).float()
            err = ((ours - ref).abs() - ref.abs() * 2**-7).max().item()
            self.check = f"max excess error {err:.3g}"
            ok = err <= 1e-6
        except Exception as e:  # a Triton/driver problem must not stop training: fall back
            self.check, ok = f"{type(e).__name__}: {e}", False
        self.use_triton = ok

    def __call__(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight; written into `out` (a contiguous (out, in) block) when given."""
        if not self.verified:
            self.verify(dtype)
        if self.use_triton:
            return self._triton(dtype, out)
        w = self._bnb(dtype)
        return w if out is None else out.copy_(w)
