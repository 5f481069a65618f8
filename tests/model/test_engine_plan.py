"""One rule for what the engine runs (model/engine_plan.py): train/recipe.build_model installs what it says,
and the planner predicts for what it says — including the cases where the two once disagreed
(`--no-fast-lora` and `--targets attention` fused the layer while the planner assumed they didn't)."""

import pytest
import torch

from codetune.config import build
from codetune.model.engine_plan import engine_plan
from codetune.model.layers import LayerRunner, decoder_layers
from codetune.model.lora_fast import FastLoRAForward
from codetune.plan.memory import estimate
from codetune.train.recipe import build_model

SECTIONS = ["model", "adapter", "data", "train"]
CASES = {
    "default": {},
    "no-fast-lora": {"train.fast_lora": False},
    "attention-only": {"adapter.targets": "attention"},
    "lora-dropout": {"adapter.lora_dropout": 0.1},
    "no-fast-layers": {"train.fast_layers": False},
    "full-last-1": {"adapter.method": "full", "adapter.train_layers": "last:1", "model.precision": "bf16"},
}


def _cfgs(model, **flags):
    return build(SECTIONS, flags={"model.model": model, "model.random_init": True, "data.seq_len": 64, **flags})


@pytest.mark.parametrize("case", list(CASES))
def test_build_model_installs_what_the_plan_says(case):
    cfgs = _cfgs("tiny-stablelm", **CASES[case])
    plan = engine_plan(cfgs, cuda=False)
    model, _ = build_model(cfgs, torch.device("cpu"), 512)
    lora_fast = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), FastLoRAForward)]
    assert bool(lora_fast) == plan.fused_lora, plan
    runners = [layer.__dict__["forward"] for layer in decoder_layers(model)]
    assert all(isinstance(r, LayerRunner) for r in runners)
    fused = [r.fast is not None for r in runners]
    if not plan.fused_layers:
        assert not any(fused), plan
    elif cfgs["adapter"].method == "lora":
        assert all(fused), plan
    else:  # method full: the frozen layers fuse, the trained last one keeps transformers' forward
        assert fused == [True] * (len(fused) - 1) + [False]
    assert model.config._attn_implementation == ("codetune_packed" if plan.packed_attention else "sdpa")


def test_the_disagreements_of_old_are_gone():
    assert not engine_plan(_cfgs("stable-code-3b", **{"train.fast_lora": False})).fused_layers
    assert engine_plan(_cfgs("stable-code-3b", **{"adapter.targets": "attention"})).fused_layers
    assert engine_plan(_cfgs("stable-code-3b", **{"adapter.lora_dropout": 0.1})).cuda_graphs == "off"


@pytest.mark.parametrize("case", list(CASES))
def test_the_planner_asks_the_same_rule(case):
    cfgs = _cfgs("stable-code-3b", **CASES[case])
    b = estimate(cfgs)
    assert b.settings["engine"] == engine_plan(cfgs, cuda=True, processes=1, tied_embeddings=False)
    # and predicts accordingly: the fused layer's recompute term only where the engine fuses
    fused_term = estimate(_cfgs("stable-code-3b")).parts["layer_recompute"]
    if b.settings["engine"].fused_layers and cfgs["adapter"].method == "lora":
        assert b.parts["layer_recompute"] == fused_term
    elif cfgs["adapter"].method == "lora":
        assert b.parts["layer_recompute"] != fused_term


def test_build_model_gives_both_installers_one_state_with_its_options():
    """bench/train_bench.py's A/B flags reach the engine through build_model's options (once a module
    constant it reassigned): the fused linears and layers of one model share one EngineState."""
    from codetune.model.engine_state import EngineOptions

    options = EngineOptions(mlp_chunk_bytes=4096, nf4_dequant="bitsandbytes")
    model, _ = build_model(_cfgs("tiny-stablelm"), torch.device("cpu"), 512, options)
    states = {id(m.__dict__["forward"].proj.state) for m in model.modules()
              if isinstance(m.__dict__.get("forward"), FastLoRAForward)}
    states |= {id(layer.__dict__["forward"].fast.state) for layer in decoder_layers(model)}
    assert len(states) == 1
    assert decoder_layers(model)[0].__dict__["forward"].fast.state.options is options
