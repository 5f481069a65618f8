"""The matrix-vector products of a decode step (y = x W^T + b for a few rows x), as a Triton kernel.

Why: a one-token step of stable-code-3b reads every weight once and does little else, so its speed is the
bandwidth its products reach. cuBLAS picks tiles made for matrices; for one row its kernels reached about
half the H200's bandwidth on the step's 13-70 MB weights (bench/decode_profile.py, the records under
bench/results/raw/s10-profile_*). Here each program reads BLOCK_N rows of W (BLOCK_K columns at a
time, fp32 accumulation) and, with SPLIT_K > 1, only its share of the columns: the partial sums land in
an fp32 buffer that a second small kernel adds in a fixed order, so results are deterministic (no atomics)
and the same for every replay of a CUDA graph.

Numerics: products and sums in fp32, the output rounded once to the inputs' dtype, as cuBLAS does, in
another order of summation: results agree to rounding, not bit for bit. Not used by any path yet:
bench/gemv_sweep.py measures it against F.linear at the step's shapes on the GPU, and a caller that
adopts it checks it first (exact-or-fallback, as model/step_attention checks the split attention).

Inputs: x (..., K) with at most MAX_ROWS rows, W (N, K) contiguous (nn.Linear's layout), optional bias (N,).
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers check `available()` and use F.linear
    triton = None

MAX_ROWS = 16  # beyond a decode batch's rows the product is a matrix product: cuBLAS's
BLOCK_N, BLOCK_K, SPLIT_K, NUM_WARPS = 8, 512, 1, 4  # chosen, not tuned: bench/gemv_sweep.py


def available() -> bool:
    return triton is not None


def gemv_reference(x, weight, bias=None, split_k: int = 1) -> torch.Tensor:
    """The kernel's algorithm in PyTorch ops: fp32 partial products over SPLIT_K column chunks, added in
    order, rounded once. For tests, and the definition of what the kernel does."""
    k = weight.shape[1]
    chunk = math.ceil(k / split_k)
    xf, wf = x.float(), weight.float()
    total = None
    for start in range(0, k, chunk):
        part = xf[..., start:start + chunk] @ wf[:, start:start + chunk].T
        total = part if total is None else total + part
    if bias is not None:
        total = total + bias.float()
    return total.to(x.dtype)


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, rows, n_out, k_in, sx, sy,
                     K_PER_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_live = n < n_out
        w_rows = w_ptr + n[:, None].to(tl.int64) * k_in
        k_start = split * K_PER_SPLIT  # (K_PER_SPLIT is a multiple of BLOCK_K: a split ends on a tile)
        for r in range(ROWS):  # (a few rows: each reads W from L2 after the first)
            if r < rows:
                acc = tl.zeros((BLOCK_N,), tl.float32)
                for t in range(0, K_PER_SPLIT, BLOCK_K):
                    k = k_start + t + tl.arange(0, BLOCK_K)
                    k_live = k < k_in
                    x = tl.load(x_ptr + r * sx + k, mask=k_live, other=0.0).to(tl.float32)
                    w = tl.load(w_rows + k[None, :], mask=n_live[:, None] & k_live[None, :], other=0.0)
                    acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                if PARTIAL:  # (split, row, n) in fp32; the bias is added by the reduction
                    tl.store(y_ptr + (split * rows + r).to(tl.int64) * n_out + n, acc, mask=n_live)
                else:
                    if HAS_BIAS:
                        acc += tl.load(b_ptr + n, mask=n_live, other=0.0).to(tl.float32)
                    tl.store(y_ptr + r * sy + n, acc.to(y_ptr.dtype.element_ty), mask=n_live)

    @triton.jit
    def _reduce_kernel(p_ptr, b_ptr, y_ptr, rows, n_out, sy, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
        r = tl.program_id(0)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = n < n_out
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(SPLITS):  # in order: the same sum every time
            acc += tl.load(p_ptr + (s * rows + r).to(tl.int64) * n_out + n, mask=live, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=live, other=0.0).to(tl.float32)
        tl.store(y_ptr + r * sy + n, acc.to(y_ptr.dtype.element_ty), mask=live)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = BLOCK_N,
         block_k: int = BLOCK_K, split_k: int = SPLIT_K, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """x @ weight.T + bias for x of at most MAX_ROWS rows (see the module docstring); CUDA tensors. The
    launch knobs are for bench/gemv_sweep.py; callers keep the defaults."""
    if triton is None:
        raise RuntimeError("gemv needs Triton (CUDA installs have it); callers fall back to F.linear")
    n_out, k_in = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    rows = x2.shape[0]
    if x.shape[-1] != k_in or rows > MAX_ROWS or not weight.is_contiguous() or x2.stride(-1) != 1:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows of K={k_in} contiguous values and a contiguous "
                         f"(N, K) weight, not x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    y = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    rows_const = 1 << max(rows - 1, 0).bit_length()  # (a power of two: few compiled variants)
    k_per_split = math.ceil(math.ceil(k_in / split_k) / block_k) * block_k
    splits = math.ceil(k_in / k_per_split)
    grid = (triton.cdiv(n_out, block_n), splits)
    b = bias if bias is not None else y
    if splits == 1:
        _gemv_kernel[grid](x2, weight, b, y, rows, n_out, k_in, x2.stride(0), y.stride(0),
                           K_PER_SPLIT=k_per_split, HAS_BIAS=bias is not None, ROWS=rows_const, BLOCK_N=block_n,
                           BLOCK_K=block_k, PARTIAL=False, num_warps=num_warps)
    else:
        part = torch.empty((splits, rows, n_out), dtype=torch.float32, device=x.device)
        _gemv_kernel[grid](x2, weight, b, part, rows, n_out, k_in, x2.stride(0), 0,
                           K_PER_SPLIT=k_per_split, HAS_BIAS=False, ROWS=rows_const, BLOCK_N=block_n,
                           BLOCK_K=block_k, PARTIAL=True, num_warps=num_warps)
        _reduce_kernel[(rows, triton.cdiv(n_out, 1024))](part, b, y, rows, n_out, y.stride(0), SPLITS=splits,
                                                          HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
    return y.view(*lead, n_out)
