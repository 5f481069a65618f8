"""The second model family through the fused path (model/arch/qwen2.py): tiny-qwen2 (RMSNorm, full rotary,
grouped-query attention, q/k/v bias, tied embeddings) against transformers' own Qwen2 forward and backward —
logits and every LoRA gradient, fp32 on the CPU, as tests/model/test_fast_layer.py does for StableLM — and
where the fused layer steps aside (sliding-window attention)."""

import logging

import pytest
import torch
from test_fast_layer import _assert_bf16_as_accurate, _compare, _model  # (StableLM's parity harness)

from codetune import registry
from codetune.model.engine_state import EngineOptions
from codetune.model.fast_layer import fast_forward, why_not_fused
from codetune.model.layers import decoder_layers, install_layer_runners, uninstall_layer_runners


def _qwen(dtype=torch.float32, **arch):
    m = _model(dtype, "tiny-qwen2", **arch)
    attn = decoder_layers(m)[0].self_attn
    assert attn.q_proj.base_layer.bias is not None and attn.o_proj.base_layer.bias is None  # what is tested
    lm = m.get_base_model()
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # tied
    with torch.no_grad():  # non-zero biases and norm weights: a dropped bias or weight would go unseen at 0/1
        for layer in decoder_layers(m):
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.base_layer.bias.normal_(std=0.5)
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                n.weight.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("checkpoint", [True, False])
def test_qwen2_fast_layer_matches_transformers(checkpoint):
    m = _qwen()
    ids = torch.randint(0, 256, (2, 24))
    _compare(m, ids, torch.roll(ids, -1, 1), checkpoint=checkpoint)


def test_qwen2_fast_layer_on_packed_documents():
    m = _qwen()
    ids = torch.randint(0, 256, (1, 30))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    _compare(m, ids, torch.roll(ids, -1, 1), position_ids=pos)


@pytest.mark.parametrize("arch", [{"num_key_value_heads": 4}, {"num_key_value_heads": 1}])
def test_qwen2_fast_layer_variants(arch):
    """Plain multi-head and multi-query attention as well as tiny-qwen2's 4-over-2 grouping."""
    m = _qwen(**arch)
    ids = torch.randint(0, 256, (2, 16))
    _compare(m, ids, torch.roll(ids, -1, 1))


def test_qwen2_chunked_mlp_matches_transformers():
    m = _qwen()
    ids = torch.randint(0, 256, (2, 30))
    _compare(m, ids, torch.roll(ids, -1, 1), options=EngineOptions(mlp_chunk_bytes=7 * 172 * 4 * 2))


def test_qwen2_bf16_as_accurate_as_transformers():
    _assert_bf16_as_accurate(_qwen())


def test_qwen2_sliding_window_steps_aside_with_a_logged_reason(caplog):
    """A sliding-window layer keeps transformers' forward (the fused and packed paths attend to the whole
    document); the other layers stay fused, and the installer says which stepped aside and why."""
    m = _qwen(use_sliding_window=True, sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    layers = decoder_layers(m)
    assert layers[0].self_attn.sliding_window is None and layers[1].self_attn.sliding_window == 8
    assert fast_forward(layers[0]) is not None and fast_forward(layers[1]) is None
    assert "sliding-window" in why_not_fused(layers[1])
    with caplog.at_level(logging.INFO, logger="codetune.model.layers"):
        install_layer_runners(m, checkpoint=True, offload=False, fast=True)
    assert "1 of 2 decoder layers keep transformers' forward: sliding-window" in caplog.text
    ids = torch.randint(0, 256, (1, 20))
    out = m(input_ids=ids).logits
    uninstall_layer_runners(m)
    torch.testing.assert_close(out, m(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_qwen2_registry_shape():
    """The 1.5B entry is Qwen2.5-Coder-1.5B's exact shape (random init: weights don't change memory)."""
    from transformers import AutoModelForCausalLM

    spec = registry.lookup("qwen2.5-coder-1.5b")
    cfg = spec.hf_config()
    assert cfg.model_type == "qwen2" and spec.tokens.fim_prefix == "<|fim_prefix|>"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304  # Qwen's card: 1.54B (tied table)
    assert type(decoder_layers(model)[0]).__name__ == "Qwen2DecoderLayer"
