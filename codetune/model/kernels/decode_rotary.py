"""A one-token step's rotary embedding and KV-cache write, in one kernel (inference only).

Why: transformers' StableLM attention rotates q and k with slices, a negation, concatenations, two
products and a sum each, then writes k and v into the static cache through an arange, two adds and two
index copies: about 17 launches a layer, each a few microseconds of a step that moves a few KB
(bench/decode_profile.py; the counts in bench/results/raw/s10-profile_*). Here one program per (row, head)
rotates its q head and, for the first Hkv heads, its k head, and writes k and v at the cache's write
position, which it reads from the cache's own device-side counter (so one captured graph serves every
position). The counter's increment stays the caller's (one add), as in transformers' StaticLayer.update.

Bit for bit transformers' result, bf16 only: `q * cos + rotate_half(q) * sin` there is three
elementwise kernels, each computing in fp32 and rounding to bf16; here the same products and sum, each
rounded to bf16 in between (the product of two bf16 values is exact in fp32, so one rounding of it equals
PyTorch's), on the bits (kernels/rotary_triton._bf16: Triton folds a plain .to(bf16).to(fp32) round trip
away). The caller checks that on the model's own shapes before using it (model/step_rotary.py: exact or
not used). fp16 and fp32 are not taken (no such rounding helper; in fp32 the compiler may fuse a product
and a sum into one rounding).

Inputs: the projections' outputs q (B, 1, H*D), k and v (B, 1, Hkv*D), each head's D values contiguous;
cos and sin (B, 1, R) of the step's position (R <= D rotated dims, the rest passed through); the cache's
keys and values (B, Hkv, L, D) and its counter (a 0-dim int64 tensor). Returns q rotated, (B, H, 1, D).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers check `available()` and keep transformers' ops
    triton = None

DTYPES = (torch.bfloat16,)


def available() -> bool:
    return triton is not None


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary on the first R dims of heads x (B, heads, 1, D), in the dtype's own ops; the
    rest passed through. The definition the kernel is held to."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    c, s = cos[:, None], sin[:, None]  # (B, 1, 1, R): every head
    return torch.cat(((rot * c) + (turned * s), rest), dim=-1)


def rotary_cache_reference(q, k, v, cos, sin, keys, values, position, heads: int, kv_heads: int) -> torch.Tensor:
    """The kernel's job in PyTorch ops (tests on the CPU, and its definition): q and k rotated as
    transformers rotates them, k and v written at `position` (the counter is not moved)."""
    b, d = q.shape[0], q.shape[-1] // heads
    qh = q.view(b, 1, heads, d).transpose(1, 2)
    kh = k.view(b, 1, kv_heads, d).transpose(1, 2)
    vh = v.view(b, 1, kv_heads, d).transpose(1, 2)
    at = position.reshape(1).to(keys.device)
    keys.index_copy_(2, at, rotate_reference(kh, cos, sin))
    values.index_copy_(2, at, vh)
    return rotate_reference(qh, cos, sin).contiguous()


if triton is not None:
    from codetune.model.kernels.rotary_triton import _bf16

    @triton.jit
    def _rotate(row_ptr, d, partner, live, rot, first, c, s):
        x = tl.load(row_ptr + d, mask=live, other=0.0)
        xp = tl.load(row_ptr + partner, mask=rot, other=0.0).to(tl.float32)
        turned = tl.where(first, -xp, xp)  # rotate_half: (-x2, x1)
        a = _bf16(x.to(tl.float32) * c)  # (each product rounded to bf16, as PyTorch's mul kernel rounds it)
        b = _bf16(turned * s)
        return tl.where(rot, _bf16(a + b).to(tl.bfloat16), x)

    @triton.jit
    def _rotary_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr,
                             sq, sk, sv, sc, ss, skc_b, skc_h, skc_n, svc_b, svc_h, svc_n, cache_len,
                             H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        live = d < D
        rot = d < R
        first = d < R // 2
        partner = tl.where(first, d + R // 2, d - R // 2)
        c = tl.load(cos_ptr + b * sc + d, mask=rot, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * ss + d, mask=rot, other=0.0).to(tl.float32)
        q = _rotate(q_ptr + b.to(tl.int64) * sq + h * D, d, partner, live, rot, first, c, s)
        tl.store(qo_ptr + (b * H + h).to(tl.int64) * D + d, q, mask=live)
        if h < HKV:
            pos = tl.load(pos_ptr)
            ok = live & (pos < cache_len)  # (never past the cache: the decoders size it for the whole generation)
            k = _rotate(k_ptr + b.to(tl.int64) * sk + h * D, d, partner, live, rot, first, c, s)
            tl.store(kc_ptr + b.to(tl.int64) * skc_b + h.to(tl.int64) * skc_h + pos * skc_n + d, k, mask=ok)
            v = tl.load(v_ptr + b.to(tl.int64) * sv + h * D + d, mask=live, other=0.0)
            tl.store(vc_ptr + b.to(tl.int64) * svc_b + h.to(tl.int64) * svc_h + pos * svc_n + d, v, mask=ok)


def rotary_cache(q, k, v, cos, sin, keys, values, position, heads: int, kv_heads: int) -> torch.Tensor:
    """The Triton kernel (see the module docstring); bf16 CUDA tensors."""
    if triton is None:
        raise RuntimeError("rotary_cache needs Triton (CUDA installs have it); callers keep transformers' ops")
    b, d = q.shape[0], q.shape[-1] // heads
    r = cos.shape[-1]
    if (q.shape[1] != 1 or r > d or r % 2 or cos.shape[0] not in (1, b) or q.dtype not in DTYPES
            or any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, keys, values))):
        raise ValueError("rotary_cache takes one token a row, bf16, R <= D even, last dims contiguous")
    out = torch.empty((b, heads, 1, d), dtype=q.dtype, device=q.device)
    sc = cos.stride(0) if cos.shape[0] == b else 0
    ss = sin.stride(0) if sin.shape[0] == b else 0
    _rotary_cache_kernel[(b, heads)](
        q, k, v, cos, sin, out, keys, values, position,
        q.stride(0), k.stride(0), v.stride(0), sc, ss,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        keys.shape[2], H=heads, HKV=kv_heads, D=d, R=r, BLOCK_D=triton.next_power_of_2(d), num_warps=1)
    return out
