"""A decoder layer's training forward in four fused nodes instead of ~40 modules and ops.

Same parameters, same math, same attention kernel as transformers' decoder layer of the model's family
(model/arch/: StableLM's `StableLmDecoderLayer`, Qwen2's `Qwen2DecoderLayer`):

    x = norm1(h);  q, k, v = rotary(x [Wq; Wk; Wv]^T + LoRA)          one node (kernels/fused_lora._Fused)
    h = h + o_proj(attention(q, k, v))                               transformers' attention function
    m = silu(g) * u  with  g, u = norm2(h) [Wg; Wu]^T + LoRA           one node
    h = h + down_proj(m)                                             one node
    (past EngineOptions.mlp_chunk_bytes the last two lines run in sequence chunks: _ChunkedMLP)

Why: the 4k-token step was CPU-bound (bench/results: 262 ms of GPU work in a 465 ms step) on per-op
and per-module Python overhead, x3 per layer (forward, recomputed forward, backward). Fusing the
q/k/v and gate/up projections also dequantizes their NF4 weights into one matrix and runs one matmul.

Used only where it is exact (`fast_forward` returns None otherwise, and the caller keeps transformers'
forward): a family model/arch/ knows, none of what its `why_not_fused` names (StableLM: q/k layer norm;
Qwen2: sliding-window attention), no dropout, every projection either a frozen linear or a PEFT LoRA linear
on the fast path, no Accelerate weight-offload hooks. Caches (generation) always take transformers'
path. `why_not_fused` is the one rule; tests/model/test_fast_layer.py (StableLM) and
tests/model/test_fast_layer_qwen2.py hold the parity tests against transformers.

This module changes nothing by itself: model/layers.py (the one place that swaps layer forwards)
calls `fast_forward(layer)` and runs what it returns.
"""

from __future__ import annotations

import torch

from codetune.model import arch as archs
from codetune.model.attention import SPAN_KEYS
from codetune.model.engine_state import EngineState
from codetune.model.kernels.fused_lora import compute_dtype_of, fused, holding
from codetune.model.kernels.rotary import Rotary, RotaryInputs
from codetune.model.lora_fast import Projections, lora_parts

_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _get(layer, dotted: str):
    m = layer
    for part in dotted.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _dropout_free(layer) -> bool:
    drop = getattr(layer, "dropout", None)
    if drop is not None and getattr(drop, "p", 0.0) > 0:
        return False
    return float(getattr(layer.self_attn, "attention_dropout", 0.0) or 0.0) == 0.0


class _ChunkedMLP(torch.autograd.Function):
    """mlp(x) over chunks of the sequence, keeping only x; backward recomputes and back-propagates one
    chunk at a time (the MLP is per-token, so chunks are independent). Inside a layer recomputed for its
    backward (grad_only) the forward computes nothing — its output is never read — so chunking then
    costs no extra FLOPs, only more, smaller launches; elsewhere it costs one more MLP forward."""

    @staticmethod
    def forward(ctx, x, fn, rows, grad_only, projections):
        ctx.fn, ctx.rows, ctx.projections = fn, rows, projections
        ctx.save_for_backward(x)
        out = torch.empty_like(x)
        if grad_only:
            return out
        with torch.no_grad(), holding(projections):  # (dequantize each weight once, not once per chunk)
            for sl in _slices(x.shape[1], rows):
                out[:, sl] = fn(x[:, sl])
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        with holding(ctx.projections):
            for sl in _slices(x.shape[1], ctx.rows):
                xc = x[:, sl].detach().requires_grad_(True)
                with torch.enable_grad():
                    out = ctx.fn(xc, grad_only=True)
                torch.autograd.backward(out, grad[:, sl])  # LoRA gradients accumulate chunk by chunk
                dx[:, sl] = xc.grad
        return dx, None, None, None, None


def mlp_chunk_rows(batch: int, seq: int, inter: int, elem: int, budget: int) -> int:
    """Sequence positions per MLP chunk: the fewest chunks that keep one (rows x intermediate) activation
    within `budget` bytes (EngineOptions.mlp_chunk_bytes: why 64 MiB, see there), of equal size, rounded up
    to a multiple of 64 past 256 (no ragged last chunk; row counts that GEMM tiles divide). `seq` (one
    chunk) when the whole MLP fits. The one rule: the fused layer and the planner (plan/memory.py) ask it."""
    limit = max(1, budget // (batch * inter * elem))
    if limit >= seq:
        return seq
    per_chunk = -(-seq // -(-seq // limit))  # ceil(seq / number of chunks)
    return min(seq, -(-per_chunk // 64) * 64 if per_chunk >= 256 else per_chunk)


def _slices(n: int, step: int):
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class FastDecoderLayer:
    """The fused training forward of one decoder layer of family `arch` (see the module docstring). `state`:
    the installation's (engine_state.EngineState), shared by all its layers."""

    def __init__(self, layer, state: EngineState, arch: archs.Arch):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.layer, self.state, self.norm = layer, state, arch.norm()
        attn = layer.self_attn
        self.mods = [_get(layer, p) for p in _PROJ]
        bases = [lora_parts(m).base for m in self.mods]
        self.qkv = Projections(bases[:3], state)
        self.o = Projections(bases[3:4], state)
        self.gate_up = Projections(bases[4:6], state)
        self.down = Projections(bases[6:7], state)
        # (the config's counts: Qwen2's attention module keeps no head counts of its own)
        self.heads, self.kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.rotary = Rotary(self.heads, self.kv_heads, self.head_dim, arch.rotary_dims(attn), state.rotary)
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                               arch.eager_attention())
        self.attention_kwargs = arch.attention_kwargs(attn)
        self.parallel = bool(getattr(layer, "use_parallel_residual", False))

    def parts(self):
        """Current adapters of the 7 projections, or None if one left the fast path (disabled, merged)."""
        parts = [lora_parts(m) for m in self.mods]
        return None if any(p is None for p in parts) else parts

    def __call__(self, hidden, attention_mask=None, position_ids=None, position_embeddings=None, parts=None,
                 grad_only=False, **kwargs):
        """The layer's output. grad_only=True: the call recomputes the layer for its backward, so the
        output's values are never read — the down projection's matmul (and, when chunked, the whole MLP
        forward) is skipped; every saved tensor the backward needs is still made."""
        layer, attn, norm = self.layer, self.layer.self_attn, self.norm
        b, s, h = hidden.shape
        x = norm(layer.input_layernorm, hidden)
        dtype = compute_dtype_of(x)
        cos, sin = position_embeddings
        q, k, v = fused(x, self.qkv, parts[:3], dtype, "rotary", RotaryInputs(self.rotary, cos.to(dtype), sin.to(dtype)))
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        # packed documents: the spans model/attention.py made for the batch (none = one document a row). The
        # position ids stay out: given them without spans, packed attention would derive spans itself.
        spans = {key: kwargs[key] for key in SPAN_KEYS if key in kwargs}
        out, _ = self.attention(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling,
                                **self.attention_kwargs, **spans)
        a = fused(out.reshape(b, s, -1), self.o, parts[3:4], dtype)

        def swiglu_mlp(t, grad_only=grad_only):
            m = fused(t, self.gate_up, parts[4:6], dtype, "swiglu")
            return fused(m, self.down, parts[6:7], dtype, "unused" if grad_only else "none")

        if self.parallel:  # x = x + attn(ln1(x)) + mlp(ln1(x))
            return hidden + a + swiglu_mlp(x)
        hidden = hidden + a
        ln2 = layer.post_attention_layernorm

        def mlp(t, grad_only=False):
            return swiglu_mlp(norm(ln2, t), grad_only)

        rows = mlp_chunk_rows(b, s, self.gate_up.sizes[0], torch.finfo(dtype).bits // 8,
                              self.state.options.mlp_chunk_bytes)
        if rows >= s:
            return hidden + mlp(hidden, grad_only)
        return hidden + _ChunkedMLP.apply(hidden, mlp, rows, grad_only, (self.gate_up, self.down))


def why_not_fused(layer) -> str | None:
    """Why `layer` keeps transformers' forward (None: the fused layer reproduces it exactly). The one rule."""
    attn = getattr(layer, "self_attn", None)
    arch = archs.of_layer(layer)
    if attn is None or arch is None:
        return f"{type(layer).__name__} is not a decoder layer of a family in model/arch/"
    if not _dropout_free(layer):
        return "dropout"
    if any(hasattr(m, "_hf_hook") for m in layer.modules()):
        return "Accelerate offload hooks"  # (they bring weights in on each module call: keep those calls)
    if any(m is None or lora_parts(m) is None for m in (_get(layer, p) for p in _PROJ)):
        return "a projection off the fused LoRA path (trained, DoRA, dropout, disabled or missing)"
    return arch.why_not_fused(layer)


def fast_forward(layer, state: EngineState | None = None) -> FastDecoderLayer | None:
    """A FastDecoderLayer for `layer` (state: the installation's; a new one if None), or None where it would
    not be exact (why_not_fused says why; model/layers.install_layer_runners logs it)."""
    if why_not_fused(layer) is not None:
        return None
    return FastDecoderLayer(layer, state or EngineState(), archs.of_layer(layer))
