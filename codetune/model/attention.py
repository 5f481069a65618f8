"""Attention over packed documents: exact, and without an L x L mask.

A packed training sequence holds several documents back to back, and its position ids restart at each
document. A token may attend only to earlier tokens of its own document. Given only the position ids,
transformers' sdpa path builds a dense block-causal (L x L) mask for that, which takes SDPA off its flash
kernel (onto the memory-efficient kernel reading an L x L bias), costs a host sync per forward to detect the
packing, and at 16k tokens is a 256 MiB tensor per batch row.

Here the documents are described once per batch by their boundaries, made on the CPU from the position ids
before the batch goes to the GPU (`document_spans`: no host sync), and handed to every layer as
transformers' variable-length keyword arguments (`cu_seq_lens_q/k`, `max_length_q/k`, the names its own
flash-attention path reads). `packed_attention`, registered with transformers' AttentionInterface under
ATTN_NAME and selected per model instance by `use_packed_attention`, then runs:

* spans given, CUDA, bf16/fp16, flash kernel usable (sm80+: RTX 30xx/40xx, A100, H100): the flash kernel's
  variable-length form (aten::_flash_attention_forward/backward), one launch over all documents; checked
  once per device/dtype/head size against the per-document path before its first use (exact-or-fallback);
* spans given otherwise (CPU, fp32, older GPUs, a failed check, or attention dropout): one causal SDPA
  call per document;
* spans not given but the position ids restart (transformers' own decoder layer drops the spans before
  calling attention: `--no-fast-layers`, or layers the fused path steps aside for): spans derived from the
  position ids on the spot (a host sync per call), then as above;
* no spans (a batch of one document each, generation): causal SDPA (flash kernel where it applies);
* an explicit attention mask (padding): transformers' own sdpa function, unchanged.

So `--attn sdpa` (the default) trains on packed data through this module; `eager`, `flex_attention` and
`flash_attention_2` keep transformers' own handling of the position ids.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ATTN_NAME = "codetune_packed"
SPAN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_MIN_SLOTS = 8  # document slots of the smallest bucket (see document_spans)


def document_spans(position_ids: torch.Tensor, static: bool = False) -> dict:
    """The layer keyword arguments that describe a packed batch's documents, from its (CPU) position ids.

    A document starts where the position does not continue the previous one (+1), and at every row start
    (rows are independent sequences). `cu_seq_lens` holds the flattened (batch x seq) start of each document
    and the total at the end. The flash kernel's grid is (max_length / 128) x documents x heads, and its
    blocks past a document's end exit at once, so:

    * static=False (eager layers): exactly one slot per document and `max_length` the longest one: no
      wasted blocks; {} when every row is one document, which then takes plain causal SDPA (on an H200 a
      single 16k document ran slower through the variable-length kernel than through SDPA's dense causal
      flash path: bench/results/train_h200_2026-12-01_verify.md against _real-path-ab.md);
    * static=True (the layers replay as CUDA graphs, which need fixed shapes and values): the slots padded
      with the total (zero-length documents) up to a power of two (at least 8) and `max_length` the row
      length, so a run sees a few shapes (a capture each) rather than one per document count."""
    pos = position_ids.detach().to("cpu", torch.int64)
    if pos.dim() == 1:
        pos = pos[None]
    b, s = pos.shape
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    begin = starts.reshape(-1).nonzero().flatten().to(torch.int32)
    if static:
        slots = max(_MIN_SLOTS, 1 << (len(begin) - 1).bit_length())
        cu = torch.full((slots + 1,), b * s, dtype=torch.int32)
        cu[: len(begin)] = begin
        longest = s
    elif len(begin) == b:
        return {}
    else:
        cu = torch.cat([begin, torch.tensor([b * s], dtype=torch.int32)])
        longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.pin_memory() if torch.cuda.is_available() else cu
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def spans_to(spans: dict, device: torch.device) -> dict:
    """The spans with their tensors on `device` (non-blocking from pinned memory)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in spans.items()}


class _VarlenFlash(torch.autograd.Function):
    """Causal flash attention over variable-length documents; q, k, v (tokens, heads, head_dim)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused,
            scale=ctx.scale)
        return dq, dk, dv, None, None, None


def _per_document(q, k, v, cu: list[int], scale: float, dropout: float = 0.0) -> torch.Tensor:
    """The reference (and fallback): one causal SDPA call per document; (tokens, heads, head_dim) in/out."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: repeat the key/value heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    pieces = []
    for a, e in zip(cu[:-1], cu[1:]):
        if e > a:  # (contiguous (1, heads, len, d) blocks: strided views can push SDPA onto its L x L math kernel)
            qd, kd, vd = (t[a:e].transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, dropout_p=dropout)
            pieces.append(o[0].transpose(0, 1))
    return torch.cat(pieces, dim=0)


@dataclass(frozen=True)
class _FlashKey:
    device: int
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int


@functools.cache
def _flash_exact(key: _FlashKey) -> bool:
    """Does the variable-length flash kernel give the per-document result on this device, for this dtype and
    head shape (forward and gradients)? Asked once per key (a memo of a fact about the hardware and build,
    not state); a failure is logged once and the per-document path is used instead."""
    if torch.cuda.get_device_capability(key.device) < (8, 0) or key.head_dim % 8 or key.head_dim > 256:
        return False
    try:
        with torch.enable_grad():  # (first use may come inside validation's no_grad)
            return _check_flash(key)
    except (RuntimeError, NotImplementedError) as e:  # kernel not built for this GPU/dtype
        log.warning("packed attention: variable-length flash kernel unavailable (%s); per-document SDPA instead", e)
        return False


def _check_flash(key: _FlashKey) -> bool:
    dev = torch.device("cuda", key.device)
    g = torch.Generator(dev).manual_seed(0)
    cu = [0, 5, 5, 70, 200]  # a short document, an empty slot, a longer one, a tail longer than 128
    t = cu[-1]
    q, k, v = (torch.randn(t, h, key.head_dim, device=dev, generator=g, dtype=torch.float32)
               .to(key.dtype).requires_grad_(True) for h in (key.heads, key.kv_heads, key.kv_heads))
    grad = torch.randn(t, key.heads, key.head_dim, device=dev, generator=g).to(key.dtype)
    scale = key.head_dim ** -0.5
    out = _VarlenFlash.apply(q, k, v, torch.tensor(cu, device=dev, dtype=torch.int32), 200, scale)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref_out = _per_document(q32, k32, v32, cu, scale)
    ref = [ref_out, *torch.autograd.grad(ref_out, (q32, k32, v32), grad.float())]
    err = max(float((a.detach().float() - b.detach()).norm() / b.detach().norm().clamp_min(1e-12)) for a, b in zip(got, ref))
    ok = err < 2e-2  # bf16 operands land at 1e-3..1e-2 against an fp32 reference
    if not ok:
        log.warning("packed attention: variable-length flash kernel differs from the reference (rel. error %.2g); "
                    "per-document SDPA instead", err)
    return ok


def _flash_usable(q: torch.Tensor, heads: int, kv_heads: int) -> bool:
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    key = _FlashKey(q.device.index if q.device.index is not None else torch.cuda.current_device(),
                    q.dtype, heads, kv_heads, q.shape[-1])
    if torch.cuda.is_current_stream_capturing():
        return _flash_exact.cache_info().currsize > 0 and _flash_exact(key)  # (checked in the eager warm-up)
    return _flash_exact(key)


def document_attention(q, k, v, cu: torch.Tensor, max_len: int, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within documents; q (tokens, heads, d), k/v (tokens, kv_heads, d) -> (tokens, heads, d).
    Attention dropout (a model whose config asks for it) takes the per-document path: _VarlenFlash has none."""
    if not dropout and _flash_usable(q, q.shape[1], k.shape[1]):
        return _VarlenFlash.apply(q, k, v, cu, max_len, scale)
    return _per_document(q, k, v, cu.tolist(), scale, dropout)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function contract: q (b, heads, s, d), k/v (b, kv_heads, s, d) ->
    ((b, s, heads, d), None). See the module docstring for which kernel runs when."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if cu is None and attention_mask is None and position_ids is not None and query.shape[2] > 1:
        # A caller that did not pass the spans (transformers' own decoder layer drops its extra keyword
        # arguments before attention: --no-fast-layers, or a layer the fused path steps aside for): derive
        # them from the position ids here. Exact, at the price of a host sync per layer call.
        kwargs = {**kwargs, **spans_to(document_spans(position_ids), query.device)}
        cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None:
        if attention_mask is None and not dropout and query.shape[2] > 1 and kwargs.get("is_causal", True):
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=key.shape[1] != query.shape[1])
            return out.transpose(1, 2), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **{k: v for k, v in kwargs.items() if k not in SPAN_KEYS})
    b, h, s, d = query.shape
    flat = [t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value)]
    scale = scaling if scaling is not None else d ** -0.5
    out = document_attention(*flat, cu, int(kwargs.get("max_length_q") or s), scale, dropout)
    return out.view(b, s, h, d), None


def use_packed_attention(model) -> str | None:
    """Select packed_attention for this model instance (its config's attention implementation), where the
    model is on sdpa. Returns the implementation it replaced, for `restore_attention`; None if unchanged."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    AttentionInterface.register(ATTN_NAME, packed_attention)  # (the library's extension point; idempotent)
    config._attn_implementation = ATTN_NAME
    return "sdpa"


def uses_packed_attention(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_NAME


def restore_attention(model, previous: str | None) -> None:
    if previous is not None:
        model.config._attn_implementation = previous
