"""A static-cache decoder's one-token steps with the rotary embedding and the KV-cache write in one
kernel (model/kernels/decode_rotary.py), for StableLM attention (stable-code-3b's).

How, without editing transformers: while a decoder's pass runs (`with rotary():`), each attention
module's forward is this module's own (an instance attribute, removed after: the model outside the
decoder is unchanged). A one-token pass through an initialized static cache layer runs transformers'
own steps in the same order — q/k/v projections (the fused q|k|v product where that is on), the
rotary and the cache write in the kernel, the counter's one add, the attention function the config
names (split-KV where selected), o_proj — and anything else (the prompt's pass, a dynamic cache,
training) goes to the class's forward unchanged.

Exact or not used: when made, the kernel is compared bit for bit with transformers' own
`apply_rotary_pos_emb` and concatenation (looked up in the attention's module, so it is this release's
math) and an index copy, on random inputs of the model's head shapes and dtype; any difference and the
decoder keeps transformers' ops, saying why. `reference=True` runs the same forward with the kernel's
PyTorch definition instead (the tests' way on the CPU).
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import torch

from codetune.model.kernels import decode_rotary as kernel

log = logging.getLogger("codetune.decode")

_NAMED = ("hidden_states", "attention_mask", "position_ids", "cache", "past_key_values", "output_attentions",
          "use_cache", "position_embeddings")


def _eligible(attn) -> bool:
    return type(attn).__name__ == "StableLmAttention" and not getattr(attn, "qk_layernorm", False) \
        and hasattr(attn, "rotary_ndims")


def check_kernel(attn, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, fn=None) -> bool:
    """The kernel against transformers' own rotary (this release's `apply_rotary_pos_emb` and `torch.cat`)
    and an index copy, bit for bit, on seeded inputs of these shapes: two rows, position 3 of 8."""
    fn = fn or kernel.rotary_cache
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    r = attn.rotary_ndims
    g = torch.Generator().manual_seed(0)
    b, length, pos = 2, 8, 3
    q = torch.randn(b, 1, heads * head_dim, generator=g).to(device, dtype)
    k = torch.randn(b, 1, kv_heads * head_dim, generator=g).to(device, dtype)
    v = torch.randn(b, 1, kv_heads * head_dim, generator=g).to(device, dtype)
    angle = torch.randn(b, 1, r // 2, generator=g) * 8
    cos, sin = (f(torch.cat([angle, angle], -1)).to(device, dtype) for f in (torch.cos, torch.sin))
    qh = q.view(b, 1, heads, head_dim).transpose(1, 2)
    kh = k.view(b, 1, kv_heads, head_dim).transpose(1, 2)
    q_rot, k_rot = apply(qh[..., :r], kh[..., :r], cos, sin)
    want_q = torch.cat((q_rot, qh[..., r:]), dim=-1)
    want_k = torch.cat((k_rot, kh[..., r:]), dim=-1)
    keys = torch.zeros(b, kv_heads, length, head_dim, dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    got_q = fn(q, k, v, cos, sin, keys, values, torch.tensor(pos, device=device), heads, kv_heads)
    return (torch.equal(got_q, want_q) and torch.equal(keys[:, :, pos:pos + 1], want_k)
            and torch.equal(values[:, :, pos:pos + 1], v.view(b, 1, kv_heads, head_dim).transpose(1, 2))
            and not keys[:, :, :pos].any() and not keys[:, :, pos + 1:].any())


class StepRotary:
    """The fused rotary + cache write for every StableLM attention of `model`; `why_not` says why there
    is none. `with rotary():` around a decoder's passes."""

    def __init__(self, model, reference: bool = False):
        self.fn = kernel.rotary_cache_reference if reference else kernel.rotary_cache
        self.attns, self.why_not, level = self._qualify(model, reference)
        if self.why_not:  # (a failed check, unexpected where the model qualifies, is said louder)
            log.log(level, "codetune: rotary and cache write stay transformers' ops: %s", self.why_not)
            return
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # what each step's forward picks its attention from, as the class's forward does: the config's
        # function, else the modeling module's eager one (looked up once here, not per layer and step)
        self.functions = ALL_ATTENTION_FUNCTIONS
        self.eager = sys.modules[type(self.attns[0]).__module__].eager_attention_forward

    def _qualify(self, model, reference: bool) -> tuple[list, str | None, int]:
        """(the attention modules, None, 0) where the fused step can run, else ([], why not, log level)."""
        from codetune.model.layers import decoder_layers
        from codetune.model.static_cache import head_shape

        weight = model.get_input_embeddings().weight
        try:
            attns = [getattr(layer, "self_attn", None) for layer in decoder_layers(model)]
        except TypeError as e:
            return [], str(e), logging.INFO
        if not attns or not all(a is not None and _eligible(a) for a in attns):
            return [], "not StableLM attention without q/k layer norms", logging.INFO
        if not reference and weight.dtype not in kernel.DTYPES:
            return [], f"{weight.dtype} (the kernel is exact for bf16 only)", logging.INFO
        if not reference and (weight.device.type != "cuda" or not kernel.available()):
            return [], "needs CUDA and Triton", logging.INFO
        self.shape = head_shape(model)
        try:
            ok = check_kernel(attns[0], self.shape.heads, self.shape.kv_heads, self.shape.head_dim, weight.dtype,
                              weight.device, self.fn)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run here: transformers' ops
            first = (str(e).splitlines() or [""])[0][:160]
            return [], f"the kernel failed its check ({type(e).__name__}: {first})", logging.WARNING
        if not ok:
            return [], "the kernel is not bit-identical to transformers' rotary here", logging.WARNING
        return attns, None, 0

    @contextmanager
    def __call__(self):
        for a in self.attns:
            a.forward = self._forward_of(a)
        try:
            yield
        finally:
            for a in self.attns:
                del a.forward  # back to the class's own forward

    def _forward_of(self, attn):
        def forward(*args, **kwargs):
            return self._forward(attn, *args, **kwargs)
        return forward

    def _forward(self, attn, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer = _static_layer(cache, attn.layer_idx)
        positions = kwargs.get("position_embeddings")
        if (len(args) > 1 or hidden is None or hidden.shape[1] != 1 or layer is None or positions is None
                or attn.training or kwargs.get("output_attentions")):
            return type(attn).forward(attn, *args, **kwargs)
        b = hidden.shape[0]
        s = self.shape
        q, k, v = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
        cos, sin = positions
        query = self.fn(q, k, v, cos, sin, layer.keys, layer.values, layer.cumulative_length, s.heads, s.kv_heads)
        layer.cumulative_length.add_(1)
        attention = self.functions.get_interface(attn.config._attn_implementation, self.eager)
        rest = {key: val for key, val in kwargs.items() if key not in _NAMED}
        out, weights = attention(attn, query, layer.keys, layer.values, kwargs.get("attention_mask"), dropout=0.0,
                                 scaling=attn.scaling, position_ids=kwargs.get("position_ids"), **rest)
        return attn.o_proj(out.reshape(b, 1, -1)), weights


def _static_layer(cache, index: int):
    """The cache's layer `index` where it is a static layer already holding its buffers (the kernel
    writes into them at its device-side counter), else None."""
    layers = getattr(cache, "layers", None)
    if layers is None or index >= len(layers) or getattr(cache, "offloading", False):
        return None  # (an offloading cache moves layers between devices around each update: its own path)
    layer = layers[index]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", False):
        return None
    if not isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
        return None
    return layer
