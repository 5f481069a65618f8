"""The one-product q|k|v of a decode step (model/fused_qkv.py): weights become views of the stacked one with
their values unchanged, a one-token step inside `with fused():` gives the separate products' logits bit
for bit and runs the stacked product, the prompt's pass and unchecked row counts keep the three products,
and the model is its own again after the context; adapters (PEFT's LoRA linears) are left alone."""

import copy

import pytest
import torch

from codetune.config import ModelConfig
from codetune.model.fused_qkv import FusedQKV
from codetune.model.load import load_model
from codetune.model.static_cache import cache_kwarg


@pytest.fixture
def tiny():
    model, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True, precision="fp32"), torch.device("cpu"),
                          vocab_size=512, seed=1)
    return model.eval()


def _step(model, ids: torch.Tensor, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt logits, one-token step logits) through a static cache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    with torch.inference_mode():
        first = model(input_ids=ids.expand(rows, -1), **kw).logits
        step = model(input_ids=torch.full((rows, 1), 7, device=ids.device), **kw).logits
    return first, step


def test_weights_become_views_with_their_values(tiny):
    before = copy.deepcopy(tiny.state_dict())
    fused = FusedQKV(tiny)
    assert fused.why_not is None and len(fused.stacks) == len(tiny.model.layers)
    for s in fused.stacks:
        base = s.weight.untyped_storage().data_ptr()
        assert all(m.weight.untyped_storage().data_ptr() == base for m in (s.q, s.k, s.v))
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_fused_step_is_bit_identical_and_the_model_is_its_own_after(tiny, monkeypatch):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    want = _step(tiny, ids)
    fused = FusedQKV(tiny)
    used = []
    real = torch.nn.functional.linear

    def watching(x, w, b=None):
        used.append(w)
        return real(x, w, b)
    monkeypatch.setattr(torch.nn.functional, "linear", watching)
    with fused():
        got = _step(tiny, ids)
    monkeypatch.undo()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # the step's q|k|v in one product a layer; the prompt's pass in three
    assert [sum(w is s.weight for w in used) for s in fused.stacks] == [1] * len(fused.stacks)
    assert [sum(w is s.q.weight for w in used) for s in fused.stacks] == [1] * len(fused.stacks)
    for s in fused.stacks:
        assert all("forward" not in m.__dict__ for m in (s.q, s.k, s.v)) and s.x is None and s.y is None


def test_a_row_count_whose_product_differs_keeps_three_products(tiny, monkeypatch):
    import codetune.model.fused_qkv as fq

    fused = FusedQKV(tiny)
    monkeypatch.setattr(fq, "exact_on", lambda stack, x: False)  # as if 3 rows picked another kernel
    ids = torch.tensor([[3, 14, 15, 92]])
    want = _step(tiny, ids, rows=3)
    with fused():
        got = _step(tiny, ids, rows=3)
    assert torch.equal(got[1], want[1]) and fused.exact_rows[3] is False and fused.exact_rows[1] is True


def test_adapters_are_left_alone(tiny):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fused = FusedQKV(lora)
    assert not fused.stacks and "not plain linear" in fused.why_not


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_on_a_gpu_the_fused_step_is_bit_identical_or_not_used(precision):
    """cuBLAS may pick another kernel for the stacked shape: then the fusion must say so and stand aside;
    where it is used, the step's logits are the separate products' bit for bit (rows 1 and 5)."""
    model, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True, precision=precision),
                          torch.device("cuda"), vocab_size=512, seed=1)
    model.eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]], device="cuda")
    want = [_step(model, ids, rows) for rows in (1, 5)]
    fused = FusedQKV(model)
    if not fused.stacks:
        assert "bit-identical" in fused.why_not
        return
    with fused():
        got = [_step(model, ids, rows) for rows in (1, 5)]
    for (_, w), (_, g) in zip(want, got):
        assert torch.equal(w, g)


def test_a_second_fusion_on_the_same_model_stacks_nothing_again(tiny):
    """Every decoder makes its own FusedQKV; the weights they stack are the same storage (decode_bench holds
    three decoders of one model: each used to hold its own copy of every q|k|v weight)."""
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    want = _step(tiny, ids)
    first, second = FusedQKV(tiny), FusedQKV(tiny)
    for a, b in zip(first.stacks, second.stacks):
        assert a.weight.data_ptr() == b.weight.data_ptr() and a.weight.shape == b.weight.shape
        assert torch.equal(a.weight, torch.cat([a.q.weight, a.k.weight, a.v.weight]))
    with second():
        got = _step(tiny, ids)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
