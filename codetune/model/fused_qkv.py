"""q, k and v of a one-token decode step in one matrix product (inference only).

Why: transformers' attention computes `q_proj(x)`, `k_proj(x)`, `v_proj(x)` one after another. In a decode
step x is one token, and each product is a matrix-vector product that reads its weight once: three
launches over three 13 MB weights (stable-code-3b), each too small to reach the GPU's bandwidth
(bench/decode_profile.py: the step's GEMVs, bench/results/raw/s10-profile_*). One product over the
stacked [Wq; Wk; Wv] reads the same bytes in one launch.

How, without rewriting the attention: the three projections keep their modules; while a decoder's pass
runs (`with fused():`), q_proj's forward computes the stacked product and returns its q columns, and k_proj
and v_proj, called next with the same input tensor, return their columns of it (views: no copy). Any other
input, or more than one token per row (the prompt's pass: a matrix product whose tiling may differ), runs
the projection's own weight. The three weights become views into the stacked one when it is made, so no
memory is added; their values do not change.

Exact or nothing: when made, the stacked product is compared bit for bit with the three separate ones on
the model's own first-layer weights for one row (any difference — another kernel, another order of
summation — and the fusion is not used), and again on the first real input of every other row count (a
batch), outside a graph capture; a count that differs keeps the three products. Only plain `torch.nn.Linear` projections qualify (not
PEFT's LoRA layers, not bitsandbytes' quantized ones, not weights Accelerate offloads).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class _Stack:
    """One attention module's stacked projection and the last q call's input and product."""
    q: torch.nn.Linear
    k: torch.nn.Linear
    v: torch.nn.Linear
    weight: torch.Tensor  # (nq + nk + nv, in)
    bias: torch.Tensor | None
    nq: int
    nk: int
    exact_rows: dict = field(default_factory=dict)  # rows -> stacked product bit-identical (shared by all layers)
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None

    def _fuses(self, x: torch.Tensor) -> bool:
        if x.dim() < 2 or x.shape[-2] != 1:
            return False  # the prompt's pass: a matrix product, tiled its own way
        rows = x.numel() // x.shape[-1]
        ok = self.exact_rows.get(rows)
        if ok is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return False  # (not checked yet, and nothing can be compared inside a capture)
            ok = self.exact_rows[rows] = exact_on(self, x)
        return ok

    def q_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fuses(x):
            self.x = self.y = None
            return F.linear(x, self.q.weight, self.q.bias)
        self.x, self.y = x, F.linear(x, self.weight, self.bias)
        return self.y[..., :self.nq]

    def k_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is self.x:
            return self.y[..., self.nq:self.nq + self.nk]
        return F.linear(x, self.k.weight, self.k.bias)

    def v_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is self.x:
            y, self.x, self.y = self.y, None, None  # (the product's last reader: nothing held past the pass)
            return y[..., self.nq + self.nk:]
        return F.linear(x, self.v.weight, self.v.bias)


def _plain(m) -> bool:
    return type(m) is torch.nn.Linear and not hasattr(m, "_hf_hook")


def _stack(attn, exact_rows: dict) -> _Stack | None:
    """The stacked projection of an attention module whose q/k/v are plain (_plain_qkv), None where their
    shapes, dtypes or biases do not stack."""
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    ws = [m.weight for m in (q, k, v)]
    if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1 or len({m.bias is None for m in (q, k, v)}) != 1:
        return None
    # (a model a FusedQKV was made for before holds them as consecutive views already: stacking them again
    # would copy them, and both copies would live while both decoders do; bench/decode_bench.py holds three)
    weight = _stacked_already(ws)
    weight = torch.cat([w.detach() for w in ws]) if weight is None else weight
    bias = None
    if q.bias is not None:
        bias = _stacked_already([m.bias for m in (q, k, v)])
        bias = torch.cat([m.bias.detach() for m in (q, k, v)]) if bias is None else bias
    nq, nk = ws[0].shape[0], ws[1].shape[0]
    # the three weights become views of the stacked one (same values, no memory added)
    for m, (lo, hi) in zip((q, k, v), ((0, nq), (nq, nq + nk), (nq + nk, weight.shape[0]))):
        m.weight = torch.nn.Parameter(weight[lo:hi], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[lo:hi], requires_grad=m.bias.requires_grad)
    return _Stack(q, k, v, weight, bias, nq, nk, exact_rows)


def _stacked_already(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor `ts` are consecutive, contiguous parts of, in order (one storage, each starting where the
    last ends), as one (rows, ...) view; None where they are not."""
    first = ts[0]
    end = first.data_ptr()
    for t in ts:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() \
                or t.data_ptr() != end:
            return None
        end += t.numel() * t.element_size()
    shape = (sum(t.shape[0] for t in ts), *first.shape[1:])
    return first.detach().as_strided(shape, first.stride())


def exact_on(stack: _Stack, x: torch.Tensor) -> bool:
    """Whether the stacked product of `x` equals the three separate ones bit for bit."""
    y = F.linear(x, stack.weight, stack.bias)
    parts = torch.cat([F.linear(x, m.weight, m.bias) for m in (stack.q, stack.k, stack.v)], dim=-1)
    return torch.equal(y, parts)


class FusedQKV:
    """The stacked q|k|v product of every decoder layer of `model` that qualifies; `why_not` says why
    there is none. `with fused():` around a decoder's passes."""

    def __init__(self, model):
        from codetune.model.layers import decoder_layers

        self.stacks: list[_Stack] = []
        self.why_not: str | None = None
        self.exact_rows: dict[int, bool] = {}  # shared by every layer's stack (same shapes, same kernels)
        try:
            layers = list(decoder_layers(model))
        except TypeError as e:
            self.why_not = str(e)
            return
        attns = [getattr(layer, "self_attn", None) for layer in layers]
        if not attns or not all(_plain_qkv(a) for a in attns):
            self.why_not = "the q/k/v projections are not plain linear layers (an adapter, quantized or offloaded)"
            return
        first = _stack(attns[0], self.exact_rows)
        if first is None or not first._fuses(_one_row(first.weight)):  # (the check for one row, made now)
            self.why_not = "the stacked product is not bit-identical to the three separate ones here"
            return
        self.stacks = [first] + [s for s in (_stack(a, self.exact_rows) for a in attns[1:]) if s is not None]

    @contextmanager
    def __call__(self):
        for s in self.stacks:
            s.q.forward, s.k.forward, s.v.forward = s.q_forward, s.k_forward, s.v_forward
        try:
            yield
        finally:
            for s in self.stacks:
                for m in (s.q, s.k, s.v):
                    del m.forward  # back to the class's own forward
                s.x = s.y = None


def _one_row(weight: torch.Tensor) -> torch.Tensor:
    """A seeded (1, 1, in) input: one token of one row, as a decode step gives the projections."""
    x = torch.randn(1, 1, weight.shape[1], generator=torch.Generator().manual_seed(0))
    return x.to(weight.device, weight.dtype)


def _plain_qkv(attn) -> bool:
    return attn is not None and all(_plain(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj"))
