"""Attention of one query token over a long KV cache, split over the keys (flash-decoding).

Why: a decode step has one query a head. SDPA's memory-efficient kernel gives each (row, head) one block
that walks every key of the cache in turn: 32 blocks on a 132-SM H200, so at a 4,096-position cache the
32 layers' attention took most of a graphed stable-code-3b step at a 2k context (bench/decode_profile.py;
the records: bench/results/decode_h200_2026-12-01_s10-split.md, docs/performance.md). Here the keys are
cut into `splits` chunks and every (row, head, chunk) is its own program: each computes its chunk's
running max, sum of exponentials and weighted sum of values in fp32 (the online softmax), and a second
small kernel combines the chunks. The cache is read once, spread over the whole GPU.

Numerics: scores, softmax and accumulation in fp32, the output rounded once to the inputs' dtype — the
same math as SDPA's kernels, in another order of summation, so results agree to rounding, not bit for bit.
Whoever selects this kernel checks it against SDPA first (model/step_attention.py: exact-or-fallback at
first use). `split_attention_reference` is the same algorithm in PyTorch ops (its tests run on the CPU).

Inputs: query (B, H, 1, D), key and value (B, Hkv, L, D) with H a multiple of Hkv (grouped-query heads),
an optional mask broadcastable to (B, 1, 1, L), boolean (True = attend) or additive float. Output
(B, 1, H, D) contiguous: the layout transformers' attention functions return.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers check `available()` and use SDPA
    triton = None

# The launch's shape, from bench/decode_attention_sweep.py on an H200 (bench/results/raw/s11-decode.results.jsonl:
# 64-key tiles, 2 warps, ~4 programs an SM were fastest at four of its five cache shapes, one row and 16).
BLOCK_N = 64  # keys per inner tile
NUM_WARPS = 2
PROGRAMS_PER_SM = 4
NEG = -1.0e30  # the running max's start: finite, so a chunk with every key masked gives weight 0, not NaN


def available() -> bool:
    return triton is not None


def plan_splits(length: int, rows_heads: int, sms: int, block_n: int = BLOCK_N,
                programs_per_sm: int = PROGRAMS_PER_SM) -> tuple[int, int]:
    """(splits, keys per split) for a cache of `length` keys and B*H (row, head) pairs: about
    `programs_per_sm` programs per SM, each chunk a whole number of `block_n` tiles."""
    want = max(1, math.ceil(programs_per_sm * sms / max(rows_heads, 1)))
    tiles = max(1, math.ceil(length / block_n))
    splits = min(want, tiles)
    chunk = math.ceil(tiles / splits) * block_n
    return math.ceil(length / chunk), chunk


def _mask_2d(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The (B, L) view of a (B|1, 1, 1, L) mask (a query axis of one, a head axis of one)."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(f"decode attention takes a (B, 1, 1, L) mask, not {tuple(mask.shape)}")
    return mask[:, 0, 0, :length].expand(batch, length)


def split_attention_reference(query, key, value, mask=None, scale=None, splits: int = 4) -> torch.Tensor:
    """The kernel's algorithm in PyTorch ops (fp32): per chunk of keys the max, the sum of exponentials
    and the weighted values, then the chunks combined. For tests, and the definition of what the kernel does."""
    b, h, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    scale = d ** -0.5 if scale is None else scale
    group = h // hkv
    k = key.float().repeat_interleave(group, dim=1)  # (B, H, L, D)
    v = value.float().repeat_interleave(group, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", query[:, :, 0].float(), k) * scale
    m2 = _mask_2d(mask, b, length)
    if m2 is not None:
        s = torch.where(m2[:, None, :], s, float("-inf")) if m2.dtype == torch.bool else s + m2[:, None, :].float()
    chunk = math.ceil(length / splits)
    ms, ls, accs = [], [], []
    for start in range(0, length, chunk):
        sc = s[..., start:start + chunk]
        m = torch.clamp(sc.amax(dim=-1), min=NEG)
        p = torch.exp(sc - m[..., None])
        ms.append(m)
        ls.append(p.sum(-1))
        accs.append(torch.einsum("bhn,bhnd->bhd", p, v[:, :, start:start + chunk]))
    m = torch.stack(ms, -1)  # (B, H, S)
    w = torch.exp(m - m.amax(-1, keepdim=True))
    total = (w * torch.stack(ls, -1)).sum(-1)
    out = (w[..., None] * torch.stack(accs, -2)).sum(-2) / total[..., None]  # (B, H, D)
    return out.to(query.dtype)[:, None]  # (B, 1, H, D)


if triton is not None:

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, m_ptr, l_ptr,
                        sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, smk_b, smk_n,
                        length, heads, group, splits, scale,
                        CHUNK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, D: tl.constexpr,
                        DA: tl.constexpr, MASK_A: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
        # a head's D values as one tile of DA (masked past D where MASK_A) and, where HAS_B, a second
        # of DB at DA (80 = 64 + 16): unmasked along the row, so the loads stay vectorized
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // heads
        hk = (bh % heads) // group
        da = tl.arange(0, DA)
        q_row = q_ptr + b.to(tl.int64) * sq_b + (bh % heads) * sq_h
        if MASK_A:
            qa = tl.load(q_row + da, mask=da < D, other=0.0).to(tl.float32)
        else:
            qa = tl.load(q_row + da).to(tl.float32)
        if HAS_B:
            db = DA + tl.arange(0, DB)
            qb = tl.load(q_row + db).to(tl.float32)
            acc_b = tl.zeros((DB,), tl.float32)
        k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
        m_i = tl.full((), -1.0e30, tl.float32)
        l_i = tl.zeros((), tl.float32)
        acc_a = tl.zeros((DA,), tl.float32)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, length)
        for t in range(0, CHUNK, BLOCK):  # (a constant trip count: the last split's tail is masked)
            n = start + t + tl.arange(0, BLOCK)
            live = n < end
            bias = tl.zeros((BLOCK,), tl.float32)
            if HAS_MASK:
                mv = tl.load(mask_ptr + b.to(tl.int64) * smk_b + n.to(tl.int64) * smk_n, mask=live, other=0)
                if MASK_BOOL:
                    live = live & (mv != 0)
                else:
                    bias = mv.to(tl.float32)
                    live = live & (bias > -1.0e30)  # (transformers' "masked" is the dtype's min)
            # masked keys are never read: the loads are predicated, so the part of a cache not yet filled
            # (and a batch row's left padding) costs its mask bytes only
            rows = live[:, None]
            if MASK_A:
                tile_a = rows & (da[None, :] < D)
            else:
                tile_a = rows
            k_rows = k_base + n[:, None].to(tl.int64) * sk_n
            v_rows = v_base + n[:, None].to(tl.int64) * sv_n
            k = tl.load(k_rows + da[None, :], mask=tile_a, other=0.0).to(tl.float32)
            dot = tl.sum(k * qa[None, :], axis=1)
            if HAS_B:
                kb = tl.load(k_rows + db[None, :], mask=rows, other=0.0).to(tl.float32)
                dot += tl.sum(kb * qb[None, :], axis=1)
            s = tl.where(live, dot * scale + bias, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(v_rows + da[None, :], mask=tile_a, other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc_a = acc_a * alpha + tl.sum(p[:, None] * v, axis=0)
            if HAS_B:
                vb = tl.load(v_rows + db[None, :], mask=rows, other=0.0).to(tl.float32)
                acc_b = acc_b * alpha + tl.sum(p[:, None] * vb, axis=0)
            m_i = m_new
        slot = bh * splits + split
        out_row = acc_ptr + slot.to(tl.int64) * BLOCK_D
        tl.store(out_row + da, acc_a)
        if HAS_B:
            tl.store(out_row + db, acc_b)
        tl.store(m_ptr + slot, m_i)
        tl.store(l_ptr + slot, l_i)

    @triton.jit
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, splits, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_S: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        smask = s < splits
        d = tl.arange(0, BLOCK_D)
        m = tl.load(m_ptr + bh * splits + s, mask=smask, other=-1.0e30)
        l_ = tl.load(l_ptr + bh * splits + s, mask=smask, other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))
        total = tl.sum(w * l_, axis=0)
        acc = tl.load(acc_ptr + (bh * splits + s[:, None]).to(tl.int64) * BLOCK_D + d[None, :],
                      mask=smask[:, None], other=0.0)
        out = tl.sum(w[:, None] * acc, axis=0) / total
        tl.store(out_ptr + bh.to(tl.int64) * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def head_tiles(d: int, two_tiles: bool = True) -> tuple[int, int]:
    """(DA, DB): a head's D values as a power-of-two tile DA and, where D is the sum of two powers of two,
    a second DB (80 -> 64 + 16; 0 where D is a power of two); else (the next power of two, 0), masked."""
    a = 1 << (d.bit_length() - 1)
    if a == d:
        return d, 0
    rest = d - a
    if two_tiles and rest & (rest - 1) == 0:
        return a, rest
    return 2 * a, 0


def split_attention(query, key, value, mask=None, scale=None, sms: int | None = None, block_n: int = BLOCK_N,
                    num_warps: int = NUM_WARPS, programs_per_sm: int = PROGRAMS_PER_SM,
                    two_tiles: bool = True) -> torch.Tensor:
    """Triton flash-decoding (see the module docstring); CUDA tensors, one query position. The launch
    shape's knobs are for bench/decode_attention_sweep.py; callers keep the defaults."""
    if triton is None:
        raise RuntimeError("split_attention needs Triton (CUDA installs have it); callers fall back to SDPA")
    b, h, q_len, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    if q_len != 1 or h % hkv or key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("split_attention takes one query position, H a multiple of Hkv, last dims contiguous")
    scale = d ** -0.5 if scale is None else float(scale)
    if sms is None:
        sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    splits, chunk = plan_splits(length, b * h, sms, block_n, programs_per_sm)
    block_d = triton.next_power_of_2(d)  # (the partials' row stride)
    da, db = head_tiles(d, two_tiles)
    acc = torch.empty(b * h * splits * block_d, dtype=torch.float32, device=query.device)
    m = torch.empty(b * h * splits, dtype=torch.float32, device=query.device)
    l_ = torch.empty_like(m)
    m2 = _mask_2d(mask, b, length)
    if m2 is not None and m2.dtype == torch.bool:
        m2 = m2.view(torch.uint8)  # (a bool tensor's bytes, read as 0/1)
    _partial_kernel[(b * h, splits)](
        query, key, value, m2 if m2 is not None else m, acc, m, l_,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        m2.stride(0) if m2 is not None else 0, m2.stride(1) if m2 is not None else 0,
        length, h, h // hkv, splits, scale,
        CHUNK=chunk, HAS_MASK=m2 is not None, MASK_BOOL=m2 is not None and m2.dtype == torch.uint8, D=d,
        DA=da, MASK_A=da > d, DB=max(db, 1), HAS_B=db > 0, BLOCK_D=block_d,
        BLOCK=block_n, num_warps=num_warps)
    out = torch.empty((b, 1, h, d), dtype=query.dtype, device=query.device)
    _combine_kernel[(b * h,)](acc, m, l_, out, splits, D=d, BLOCK_D=block_d,
                              BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out
