"""The planner's parameter terms are exact (checked against a meta-device model + PEFT, and against
bitsandbytes' own quantization), and its activation terms behave sanely at the sizes people run."""

import pytest
import torch

from codetune import registry
from codetune.config import ConfigError, build
from codetune.plan import memory
from codetune.plan.memory import GiB, estimate, linear_weight_bytes, model_shape, trainable_tensors

SECTIONS = ["model", "adapter", "data", "train"]


def cfgs(model="stable-code-3b", seq=4096, **kw):
    """kw: flat config keys, routed to their section."""
    from codetune.config import SECTIONS as ALL

    data = {"model": {"model": model}, "data": {"seq_len": seq}}
    for key, value in kw.items():
        section = next(s for s in SECTIONS if key in ALL[s].__dataclass_fields__)
        data.setdefault(section, {})[key] = value
    return build(SECTIONS, data)


def meta_model(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(registry.lookup(name).hf_config())


@pytest.mark.parametrize("name", ["tiny-stablelm", "stable-code-3b", "tiny-qwen2", "qwen2.5-coder-1.5b"])
def test_total_params_match_the_model(name):
    model = meta_model(name)
    assert model_shape(name).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,adapter", [
    ("tiny-stablelm", dict(targets="all-linear", rank=16)),
    ("tiny-stablelm", dict(targets="attention", rank=8, train_layers="last:1")),
    ("tiny-stablelm", dict(targets="q_proj,v_proj,down_proj", rank=4, dora=True)),
    ("tiny-stablelm", dict(method="full", train_layers="last:1")),
    ("tiny-stablelm", dict(method="full", train_embeddings=True)),
    ("stable-code-3b", dict(targets="all-linear", rank=16, train_layers="last:8")),
    ("tiny-qwen2", dict(targets="all-linear", rank=8)),  # (grouped-query k/v sizes)
    ("tiny-qwen2", dict(method="full", train_layers="last:1")),  # (q/k/v biases and RMSNorm weights train)
    ("tiny-qwen2", dict(method="full", train_embeddings=True)),  # (one tied table)
])
def test_trainable_params_match_peft(name, adapter):
    from codetune.model.adapters import apply_adapters, count_parameters

    c = cfgs(name, precision="bf16", **adapter)
    model = apply_adapters(meta_model(name), c["adapter"])
    trainable, _ = count_parameters(model)
    assert sum(k for k, _ in trainable_tensors(c, model_shape(name), "bf16")) == trainable


@pytest.mark.parametrize("shape", [(172, 64), (2560, 640), (37, 100)])
def test_nf4_bytes_match_bitsandbytes(shape):
    F = pytest.importorskip("bitsandbytes.functional")
    q, st = F.quantize_4bit(torch.randn(shape, dtype=torch.bfloat16), blocksize=memory.NF4_BLOCK,
                            compress_statistics=True, quant_type="nf4")
    tensors = [q, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset]
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert linear_weight_bytes(shape[1], shape[0], "nf4") == real


def test_int8_bytes_match_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional")
    cb, scb, _ = F.int8_vectorwise_quant(torch.randn(172, 64, dtype=torch.float16))
    assert linear_weight_bytes(64, 172, "int8") == cb.numel() * cb.element_size() + scb.numel() * scb.element_size()


def test_lora_param_terms_are_exact_bytes():
    b = estimate(cfgs(rank=16))
    n = 32 * 16 * (4 * 2 * 2560 + 2 * (2560 + 6912) + (6912 + 2560))
    assert b.parts["lora_params"] == b.parts["grads"] == 4 * n
    assert b.parts["optimizer"] == 8 * n
    assert estimate(cfgs(rank=16, optimizer="paged_adamw_8bit")).parts["optimizer"] < 2.1 * n


def test_16k_nf4_with_offload_fits_6gib_without_a_dense_mask():
    # sdpa trains through packed attention (model/attention.py): no seq x seq mask, like flash_attention_2
    b = estimate(cfgs(seq=16384, precision="nf4", offload_activations="on"))
    assert b.peak_reserved <= 6 * GiB and b.parts["attn_mask"] == 0
    fa2 = estimate(cfgs(seq=16384, precision="nf4", offload_activations="on", attn="flash_attention_2"))
    assert b.peak_allocated == fa2.peak_allocated
    # eager attention materialises the mask and the scores: the planner counts them
    eager = estimate(cfgs(seq=16384, precision="nf4", offload_activations="on", attn="eager"))
    assert eager.parts["attn_mask"] > 0 and eager.peak_allocated > b.peak_allocated + 0.7 * GiB


def test_bf16_full_finetune_at_16k_does_not_fit_10gib():
    b = estimate(cfgs(seq=16384, precision="bf16", method="full"))
    assert not b.fits(10 * GiB)
    # (the frozen input embeddings stay in CPU RAM: model/engine_plan.py, as the engine does under method full)
    assert b.parts["weights"] > 4.9 * GiB and b.parts["grads"] > 4.5 * GiB


def test_memory_moves_the_right_way():
    base = estimate(cfgs(seq=4096)).peak_allocated
    assert estimate(cfgs(seq=8192)).peak_allocated > base
    assert estimate(cfgs(seq=4096, offload_activations="off")).peak_allocated > base
    assert estimate(cfgs(seq=4096, train_layers="last:8")).peak_allocated < base
    assert estimate(cfgs(seq=4096, precision="bf16")).parts["weights"] > 3 * estimate(cfgs()).parts["weights"]
    no_ckpt = estimate(cfgs(seq=4096, grad_checkpointing=False))
    assert no_ckpt.parts["activations_kept"] > 10 * GiB


def test_frozen_prefix_keeps_nothing():
    on = cfgs(seq=4096, offload_activations="off")
    assert estimate(on).parts["activations_kept"] == 32 * 4096 * 2560 * 2
    last = cfgs(seq=4096, offload_activations="off", train_layers="last:8")
    assert estimate(last).parts["activations_kept"] == 8 * 4096 * 2560 * 2


def test_local_directory_and_uncached_hub_id(tmp_path):
    registry.lookup("tiny-stablelm").hf_config().save_pretrained(tmp_path)
    local, known = model_shape(str(tmp_path)), model_shape("tiny-stablelm")
    assert (local.hidden, local.intermediate, local.layers, local.heads, local.vocab) == \
        (known.hidden, known.intermediate, known.layers, known.heads, known.vocab)
    with pytest.raises(ConfigError, match="offline"):
        model_shape("nobody/not-a-cached-model")


def test_local_qwen2_directory_reads_its_family(tmp_path):
    """config.json's model_type picks the family's facts: q/k/v bias, tied table, RMSNorm (one tensor)."""
    registry.lookup("tiny-qwen2").hf_config().save_pretrained(tmp_path)
    local = model_shape(str(tmp_path))
    assert (local.qkv_bias, local.tied, local.norm_tensors) == (True, True, 1)
    assert local.total_params() == model_shape("tiny-qwen2").total_params()


def test_full_method_rejects_quantized_weights():
    with pytest.raises(ConfigError, match="method=full"):
        estimate(cfgs(precision="nf4", method="full"))


def test_fused_engine_prediction_tracks_the_committed_measurements():
    """The fused-layer terms against session 4's same-call H200 sweep (bench/results): a recalibration
    that drifts more than 6% from a measured reserved peak fails here."""
    import json
    from pathlib import Path

    rec = json.loads((Path(__file__).parents[2] / "bench/results/train_h200_2026-11-28_s4c.json").read_text())
    rows = [r for r in rec["results"] if r.get("engine") == "codetune"]
    assert len(rows) == 6
    for r in rows:
        auto_eager = r["cuda_graphs"] == "auto" and r["seq"] > r.get("graphs_auto_max_tokens", 4096)
        graphs = "off" if auto_eager else "on"  # what ran: auto was 4,096 tokens in that call
        b = estimate(cfgs(seq=r["seq"], precision="nf4", offload_activations="on", attn="flash_attention_2",
                          cuda_graphs=graphs))
        assert abs(b.peak_reserved / GiB - r["peak_reserved_gib"]) <= 0.06 * r["peak_reserved_gib"], r
