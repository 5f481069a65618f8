"""Qwen2 (Qwen2.5-Coder): RMSNorm, full rotary, grouped-query attention, q/k/v bias, tied embeddings at
1.5B/3B, optional sliding-window attention on some layers, Qwen's FIM tokens (<|fim_prefix|> ...)."""

from __future__ import annotations

from codetune.model.arch import Arch, ShapeFacts, SpecialTokens

# Qwen2.5-Coder's tokenizer: <|endoftext|> ends a document (and is the pad), the FIM tokens have bars.
TOKENS = SpecialTokens("<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>")


def hf_config(kw: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**kw)


def shape_facts(cfg: dict) -> ShapeFacts:
    return ShapeFacts(True, bool(cfg.get("tie_word_embeddings", False)), 1)  # (Qwen2Attention: bias=True always)


def norm():
    import torch

    def rms_norm(module, x):
        """Qwen2RMSNorm.forward, op for op: the mean of squares in fp32, back to the input dtype, times the weight."""
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * x.to(dtype)
    return rms_norm


def rotary_dims(attn) -> int:
    return int(attn.head_dim)


def attention_kwargs(attn) -> dict:
    return {"sliding_window": attn.sliding_window}  # (None on the full-attention layers the fused path takes)


def eager_attention():
    from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

    return eager_attention_forward


def why_not_fused(layer) -> str | None:
    attn = layer.self_attn
    if getattr(attn, "sliding_window", None) is not None:
        return "sliding-window attention (the packed and fused paths attend to the whole document)"
    if type(layer.input_layernorm).__name__ != "Qwen2RMSNorm" or type(layer.post_attention_layernorm).__name__ \
            != "Qwen2RMSNorm":
        return "a norm that is not Qwen2RMSNorm"
    if attn.head_dim % 2:
        return "an odd head size"
    return None


ARCH = Arch("qwen2", "qwen2", "Qwen2DecoderLayer", TOKENS, hf_config, shape_facts, norm, rotary_dims,
            attention_kwargs, eager_attention, why_not_fused)
