"""StableLM (stable-code-3b): LayerNorm with bias, partial rotary (25% of each head), q/k/v bias optional,
optional q/k layer norm and parallel residual, untied embeddings, StarCoder-style FIM tokens."""

from __future__ import annotations

from codetune.model.arch import Arch, ShapeFacts, SpecialTokens

TOKENS = SpecialTokens("<|endoftext|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>")


def hf_config(kw: dict):
    from transformers import StableLmConfig

    return StableLmConfig(**kw)


def shape_facts(cfg: dict) -> ShapeFacts:
    return ShapeFacts(bool(cfg.get("use_qkv_bias", False)), bool(cfg.get("tie_word_embeddings", False)), 2)


def norm():
    import torch.nn.functional as F

    def layer_norm(module, x):  # nn.LayerNorm.forward without the module call
        return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)
    return layer_norm


def rotary_dims(attn) -> int:
    return int(attn.rotary_ndims)


def attention_kwargs(attn) -> dict:
    return {}


def eager_attention():
    from transformers.models.stablelm.modeling_stablelm import eager_attention_forward

    return eager_attention_forward


def why_not_fused(layer) -> str | None:
    import torch

    attn = layer.self_attn
    if getattr(attn, "qk_layernorm", True):
        return "q/k layer norm"
    norms = [layer.input_layernorm] + ([] if layer.use_parallel_residual else [layer.post_attention_layernorm])
    if any(not isinstance(n, torch.nn.LayerNorm) for n in norms):
        return "a norm that is not nn.LayerNorm"
    if getattr(attn, "rotary_ndims", 0) % 2:
        return "an odd number of rotary dims"
    return None


ARCH = Arch("stablelm", "stablelm", "StableLmDecoderLayer", TOKENS, hf_config, shape_facts, norm, rotary_dims,
            attention_kwargs, eager_attention, why_not_fused)
