"""The fused decoder-layer forward (model/fast_layer.py) against transformers' own layer forward: logits
and every LoRA gradient, with and without checkpointing, on packed sequences, grouped-query attention,
the parallel-residual variant and bf16; plus where it steps aside. (NF4 on CUDA: tests/gpu.)"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from codetune import registry
from codetune.model.engine_state import EngineOptions, EngineState
from codetune.model.fast_layer import fast_forward
from codetune.model.layers import decoder_layers, install_layer_runners, uninstall_layer_runners
from codetune.model.lora_fast import install_fast_lora, uninstall_fast_lora
from codetune.model.loss import linear_cross_entropy


def _model(dtype=torch.float32, name="tiny-stablelm", **arch):
    """A LoRA-wrapped random-init registry model (vocab 256) in train mode, LoRA B non-zero; arch: config
    overrides. (tests/model/test_fast_layer_qwen2.py builds tiny-qwen2 with it.)"""
    from transformers import AutoModelForCausalLM

    cfg = registry.lookup(name).hf_config(256)
    for k, v in arch.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m.train()


def _run(m, ids, labels, position_ids=None):
    lm = m.get_base_model()
    h = lm.model(input_ids=ids, position_ids=position_ids).last_hidden_state
    loss = linear_cross_entropy(h, lm.lm_head.weight, labels)
    loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    return h.detach(), g


def _compare(m, ids, labels, position_ids=None, checkpoint=True, rtol=1e-4, atol=1e-5, options=None):
    ref_h, ref_g = _run(m, ids, labels, position_ids)
    state = EngineState(options)
    install_fast_lora(m, state)
    install_layer_runners(m, checkpoint=checkpoint, offload=False, fast=True, state=state)
    assert all(layer.forward.fast is not None for layer in decoder_layers(m))
    h, g = _run(m, ids, labels, position_ids)
    uninstall_layer_runners(m)
    uninstall_fast_lora(m)
    torch.testing.assert_close(h, ref_h, rtol=rtol, atol=atol)
    assert g.keys() == ref_g.keys() and len(g) == 2 * 7 * 2
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], rtol=rtol * 10, atol=atol * 10, msg=k)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_fast_layer_matches_transformers(checkpoint):
    m = _model()
    ids = torch.randint(0, 256, (2, 24))
    _compare(m, ids, torch.roll(ids, -1, 1), checkpoint=checkpoint)


def test_fast_layer_on_packed_documents():
    """Positions restart at document starts: rotary angles and the block mask follow position_ids."""
    m = _model()
    ids = torch.randint(0, 256, (1, 30))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    _compare(m, ids, torch.roll(ids, -1, 1), position_ids=pos)


@pytest.mark.parametrize("arch", [{"num_key_value_heads": 2}, {"use_parallel_residual": True},
                                  {"partial_rotary_factor": 0.5}])
def test_fast_layer_variants(arch):
    m = _model(**arch)
    ids = torch.randint(0, 256, (2, 16))
    _compare(m, ids, torch.roll(ids, -1, 1))


def _assert_bf16_as_accurate(m32):
    """In bf16 the fused matmuls round differently (one ulp here and there), so compare accuracy: both
    paths against the fp32 result of the same weights; the fused one must be no less accurate."""
    ids = torch.randint(0, 256, (1, 32))
    labels = torch.roll(ids, -1, 1)
    exact, _ = _run(m32, ids, labels)
    m16 = m32.to(torch.bfloat16)
    ref, _ = _run(m16, ids, labels)
    install_fast_lora(m16)
    install_layer_runners(m16, checkpoint=True, offload=False, fast=True)
    fast, _ = _run(m16, ids, labels)
    uninstall_layer_runners(m16)
    uninstall_fast_lora(m16)
    err_ref = (ref.float() - exact).abs().mean().item()
    err_fast = (fast.float() - exact).abs().mean().item()
    assert err_fast <= 1.25 * err_ref + 1e-6, (err_fast, err_ref)


def test_fast_layer_bf16_as_accurate_as_transformers():
    _assert_bf16_as_accurate(_model())


def test_fast_layer_steps_aside():
    m = _model()
    m.base_model.model.model.layers[0].self_attn.qk_layernorm = True
    assert fast_forward(decoder_layers(m)[0]) is None  # q/k norms: transformers' forward
    m = _model(hidden_dropout=0.1)
    assert fast_forward(decoder_layers(m)[0]) is None
    m = _model()
    layer = decoder_layers(m)[1]
    fast = fast_forward(layer)
    assert fast is not None and fast.parts() is not None
    with m.disable_adapter():
        assert fast.parts() is None  # disabled adapters: the runner falls back to transformers' forward
    # and the runner's fallback really runs: disabled adapter == base model output
    install_layer_runners(m, checkpoint=True, offload=False, fast=True)
    ids = torch.randint(0, 256, (1, 8))
    with m.disable_adapter():
        out = m(input_ids=ids).logits
    uninstall_layer_runners(m)
    with m.disable_adapter():
        torch.testing.assert_close(out, m(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_bytes", [None, 7 * 172 * 4 * 2])
def test_grad_only_recompute_gives_the_same_gradients(chunk_bytes):
    """A layer recomputed for its backward skips the down projection (and a chunked MLP's whole forward):
    its output values are garbage by design, its gradients identical to a full recompute."""
    m = _model()
    install_fast_lora(m)
    layer = decoder_layers(m)[0]
    fast = fast_forward(layer, EngineState(EngineOptions(mlp_chunk_bytes=chunk_bytes)) if chunk_bytes else None)
    lm = m.get_base_model().model
    x = torch.randn(2, 30, 64)
    pos = torch.arange(30)[None].expand(2, -1)
    kw = {"position_embeddings": lm.rotary_emb(x, pos), "position_ids": pos}
    params = [p for p in layer.parameters() if p.requires_grad]
    grad = torch.randn(2, 30, 64)
    runs = []
    for grad_only in (False, True):
        xi = x.clone().requires_grad_(True)
        out = fast(xi, parts=fast.parts(), grad_only=grad_only, **kw)
        out.backward(grad)  # (.grad, not autograd.grad: the chunked MLP accumulates LoRA grads itself)
        runs.append([xi.grad] + [p.grad.clone() for p in params])
        m.zero_grad(set_to_none=True)
    for full, skipped in zip(*runs):
        torch.testing.assert_close(skipped, full, rtol=0, atol=0)
    uninstall_fast_lora(m)


def test_chunked_mlp_matches_transformers():
    """Long-context path: the MLP in sequence chunks (forward and a chunk-by-chunk backward)."""
    chunks = EngineOptions(mlp_chunk_bytes=7 * 172 * 4 * 2)  # 7 positions per chunk, batch 2
    m = _model()
    ids = torch.randint(0, 256, (2, 30))
    _compare(m, ids, torch.roll(ids, -1, 1), checkpoint=True, options=chunks)
    _compare(m, ids, torch.roll(ids, -1, 1), checkpoint=False, options=chunks)


class _CopyIn:
    """New weights copied in place, no optimizer step (what train/state.apply_checkpoint does)."""

    def __init__(self, params):
        self.params = params

    def step(self):
        with torch.no_grad():
            for p in self.params:
                p.copy_(p - 0.5 * p.grad)


# (fused linears in bf16: in fp32 a lone adapter's "cast" is the parameter itself, a copy that can't go stale)
@pytest.mark.parametrize("layers,dtype", [(True, torch.float32), (False, torch.bfloat16)],
                         ids=["fused-layers", "fused-linears-bf16"])
@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.5),
                                      lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
                                      lambda ps: _CopyIn(ps)],
                         ids=["sgd", "fused-adamw", "copy-in-place"])
def test_adapter_cache_follows_any_optimizer(layers, dtype, make_opt):
    """The cached compute-dtype adapters follow an optimizer that codetune did not build (no hook of
    train/optim.py's): plain SGD, and fused AdamW, which updates parameters without bumping their version
    counters (a cache keyed on versions alone kept serving the adapters of before its step); and an
    in-place write outside any optimizer step (a checkpoint load)."""
    m = _model(dtype)
    state = EngineState()
    install_fast_lora(m, state)
    if layers:  # the fused decoder layer; else the fused LoRA linears under transformers' layer
        install_layer_runners(m, checkpoint=True, offload=False, fast=True, state=state)
    opt = make_opt([p for p in m.parameters() if p.requires_grad])
    ids = torch.randint(0, 256, (1, 16))
    labels = torch.roll(ids, -1, 1)
    before, _ = _run(m, ids, labels)
    assert state.casts.entries  # (the cache was filled: the next forward would read it)
    lm = m.get_base_model()
    linear_cross_entropy(lm.model(input_ids=ids).last_hidden_state, lm.lm_head.weight, labels).backward()
    opt.step()
    after, _ = _run(m, ids, labels)
    uninstall_layer_runners(m)
    uninstall_fast_lora(m)
    reference, _ = _run(m, ids, labels)  # PEFT + transformers on the updated weights
    dist = lambda a: (a.float() - reference.float()).norm().item()  # noqa: E731
    assert dist(after) < 0.05 * dist(before)  # the step moved the output, and the fused path followed it
    if dtype == torch.float32:
        torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-5)


def test_engine_state_is_per_installation():
    """Two installations share no cache (the state is the installation's, not the module's), and a dropped
    one's step hook keeps nothing alive and does nothing."""
    import gc
    import weakref

    a, b = EngineState(), EngineState()
    a.casts.get("owner", ("k",), lambda: "cast")
    assert "owner" in a.casts.entries and not b.casts.entries
    gone = weakref.ref(b.casts)
    del b
    gc.collect()
    assert gone() is None
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    torch.optim.SGD([p], lr=1.0).step()  # every live cache empties; the dead one's hook is a no-op
    assert not a.casts.entries
