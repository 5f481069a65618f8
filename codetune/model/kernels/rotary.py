"""Rotary embedding (partial or full) of q and k, in place on a fused q|k|v output (kernels/fused_lora.py's "rotary"
epilogue): transformers' `q*cos + rotate_half(q)*sin` with PyTorch ops, or on CUDA one Triton launch
(kernels/rotary_triton.py) once the installation's first-use check has seen it give the same bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from codetune.model.engine_state import KernelCheck
from codetune.model.kernels.rotary_triton import rotary_triton


class Rotary:
    """Partial rotary embedding of q and k, applied in place on the fused q|k|v output (transformers'
    `q*cos + rotate_half(q)*sin` on the first `rot` dims of each head, same rounding, op for op).
    On CUDA one Triton launch (kernels/rotary_triton.py) replaces the eight strided elementwise ops, once
    `check` (the installation's, engine_state.EngineState.rotary: shared by all its layers) has seen it
    give the same bits at its first use."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, rot: int, check: KernelCheck | None = None):
        self.heads, self.kv_heads, self.head_dim, self.rot = heads, kv_heads, head_dim, rot
        self.check = check if check is not None else KernelCheck()

    def _parts(self, y: torch.Tensor, batch: int):
        n, hd = y.shape[0], self.head_dim
        seq = n // batch
        q_end, k_end = self.heads * hd, (self.heads + self.kv_heads) * hd
        if self.heads == self.kv_heads:  # q and k in one strided view: half the launches
            yield y[:, :k_end].view(batch, seq, 2, self.heads, hd)[..., :self.rot], 2
        else:
            yield from self._head_views([(y[:, :q_end], self.heads), (y[:, q_end:k_end], self.kv_heads)], batch)

    def _head_views(self, tensors, batch: int):
        for t, heads in tensors:
            yield t.view(batch, t.shape[0] // batch, heads, self.head_dim)[..., :self.rot], 1

    def apply_(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int,
               inverse: bool = False) -> None:
        """y: (batch*seq, q|k|v); cos/sin: (batch or 1, seq, rot). inverse=True applies the transpose
        (the backward of a rotation)."""
        check = self.check
        if y.is_cuda and check.ok is not False:
            ref = y.clone() if check.ok is None else None  # first use: check against the PyTorch ops
            if self._kernel(y, cos, sin, batch, self.heads + self.kv_heads, inverse):
                if ref is not None:
                    self._ops(self._parts(ref, batch), cos, sin, inverse)
                    ok = bool(torch.equal(y, ref))
                    check.record(ok, "identical" if ok else "differs: PyTorch ops used from now on")
                    y.copy_(ref)
                return
        self._ops(self._parts(y, batch), cos, sin, inverse)

    def _kernel(self, t: torch.Tensor, cos, sin, batch: int, heads: int, inverse: bool) -> bool:
        """rotary_triton on t, False where it doesn't apply or failed (then the PyTorch ops run)."""
        try:
            return rotary_triton(t, cos, sin, batch, heads, self.head_dim, self.rot // 2, inverse)
        except Exception as e:  # noqa: BLE001 - a Triton/driver problem must not stop training: PyTorch ops from now on
            self.check.record(False, f"{type(e).__name__}: {e}")
            return False

    def apply_qk_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int,
                  inverse: bool = False) -> None:
        """The same on separate q (batch*seq, heads*hd) and k (batch*seq, kv_heads*hd) tensors (the
        backward gets dq and dk from attention as two tensors: no concatenated copy)."""
        todo = []
        for t, heads in ((q, self.heads), (k, self.kv_heads)):
            # (the kernel was checked against the PyTorch ops by the forward's first apply_)
            if not (t.is_cuda and self.check.ok and self._kernel(t, cos, sin, batch, heads, inverse)):
                todo.append((t, heads))
        if todo:
            self._ops(self._head_views(todo, batch), cos, sin, inverse)

    def _ops(self, parts, cos, sin, inverse):
        half = self.rot // 2
        for part, extra in parts:
            shape = (cos.shape[0], cos.shape[1]) + (1,) * extra + (half,)
            c1, c2 = cos[..., :half].reshape(shape), cos[..., half:].reshape(shape)
            s1, s2 = sin[..., :half].reshape(shape), sin[..., half:].reshape(shape)
            x1, x2 = part[..., :half], part[..., half:]
            if inverse:  # transpose of [[c1, -s1], [s2, c2]]
                n1, n2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
            else:
                n1, n2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
            x1.copy_(n1)
            x2.copy_(n2)


class RotaryInputs(NamedTuple):
    """The "rotary" epilogue's rotation and angles (cos/sin: (batch or 1, seq, rot), in the compute dtype)."""
    rotary: Rotary
    cos: torch.Tensor
    sin: torch.Tensor
