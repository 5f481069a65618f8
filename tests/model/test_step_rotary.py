"""The one-token step's rotary embedding + KV-cache write in one kernel (model/step_rotary.py,
model/kernels/decode_rotary.py): the kernel's PyTorch definition is transformers' rotary bit for bit
(fp32 and bf16), a step inside `with rotary():` gives transformers' logits bit for bit and writes the same
cache, the prompt's pass and dynamic caches keep the class's forward, the model is its own after, and
the kernel itself matches its definition in Triton's interpreter (bf16, rounded on the bits as on a GPU)."""

import os
import subprocess
import sys

import pytest
import torch

from codetune.config import ModelConfig
from codetune.model.kernels import decode_rotary as dr
from codetune.model.load import load_model
from codetune.model.static_cache import cache_kwarg
from codetune.model.step_rotary import StepRotary, check_kernel


def _tiny(precision="fp32"):
    model, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True, precision=precision),
                          torch.device("cpu"), vocab_size=512, seed=1)
    return model.eval()


def _steps(model, rotary=None, rows: int = 2):
    """Prompt logits, two one-token steps' logits and the cache's keys/values after, through a static cache."""
    from transformers import DynamicCache, StaticCache

    cache = StaticCache(config=model.config, max_cache_len=32)
    kw = {cache_kwarg(model): cache, "use_cache": True}
    out = []
    ctx = rotary() if rotary is not None else torch.no_grad()
    with torch.inference_mode(), ctx:
        device = model.get_input_embeddings().weight.device
        out.append(model(input_ids=torch.tensor([[3, 14, 15, 92, 65]], device=device).expand(rows, -1), **kw).logits)
        for t in (7, 11):
            out.append(model(input_ids=torch.full((rows, 1), t, device=device), **kw).logits)
        dyn = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([[1, 2]], device=device), **{cache_kwarg(model): dyn, "use_cache": True})
    kv = [torch.cat([layer.keys, layer.values]) for layer in cache.layers]
    return out, kv


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_fused_step_is_transformers_step_bit_for_bit(precision, monkeypatch):
    model = _tiny(precision)
    want, want_kv = _steps(model)
    rotary = StepRotary(model, reference=True)
    assert rotary.why_not is None and len(rotary.attns) == len(model.model.layers)
    calls = []
    real = rotary.fn
    monkeypatch.setattr(rotary, "fn", lambda *a: calls.append(1) or real(*a))
    got, got_kv = _steps(model, rotary)
    assert len(calls) == 2 * len(model.model.layers)  # the two one-token steps, every layer; not the prompt
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got_kv, want_kv))
    assert all("forward" not in vars(a) for a in rotary.attns)  # the class's forward again


def test_the_definition_is_transformers_rotary_and_a_wrong_one_fails_the_check():
    model = _tiny("bf16")
    attn = model.model.layers[0].self_attn
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    args = (attn, c.num_attention_heads, c.num_key_value_heads, d, torch.bfloat16, torch.device("cpu"))
    assert check_kernel(*args, fn=dr.rotary_cache_reference)

    def off_by_one_position(q, k, v, cos, sin, keys, values, position, h, hkv):
        return dr.rotary_cache_reference(q, k, v, cos, sin, keys, values, position + 1, h, hkv)

    def unrounded(q, k, v, cos, sin, keys, values, position, h, hkv):  # the sum in fp32, rounded once
        kf, vf = keys.float(), values.float()
        out = dr.rotary_cache_reference(q.float(), k.float(), v.float(), cos.float(), sin.float(), kf, vf,
                                        position, h, hkv)
        keys.copy_(kf), values.copy_(vf)
        return out.to(q.dtype)

    assert not check_kernel(*args, fn=off_by_one_position)
    assert not check_kernel(*args, fn=unrounded)


def test_it_steps_aside_where_it_cannot_run():
    assert "CUDA" in StepRotary(_tiny("bf16")).why_not  # (the kernel proper: CUDA with Triton only)
    assert "bf16 only" in StepRotary(_tiny("fp32")).why_not
    model = _tiny("bf16")
    model.model.layers[1].self_attn.qk_layernorm = True  # (a StableLM with q/k norms: not taken)
    assert "without q/k layer norms" in StepRotary(model, reference=True).why_not


def test_the_triton_kernel_matches_its_definition_in_the_interpreter():
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from codetune.model.kernels import decode_rotary as dr\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for b, h, hkv, d, r in ((2, 4, 2, 80, 20), (1, 3, 3, 64, 64), (3, 4, 1, 80, 32)):\n"
        "    dt = torch.bfloat16\n"
        "    q = torch.randn(b, 1, h * d, generator=g).to(dt)\n"
        "    k, v = (torch.randn(b, 1, hkv * d, generator=g).to(dt) for _ in range(2))\n"
        "    ang = torch.randn(b, 1, r // 2, generator=g) * 3\n"
        "    cos, sin = (f(torch.cat([ang, ang], -1)).to(dt) for f in (torch.cos, torch.sin))\n"
        "    caches = [torch.zeros(b, hkv, 16, d, dtype=dt) for _ in range(4)]\n"
        "    pos = torch.tensor(5)\n"
        "    a = dr.rotary_cache(q, k, v, cos, sin, caches[0], caches[1], pos, h, hkv)\n"
        "    w = dr.rotary_cache_reference(q, k, v, cos, sin, caches[2], caches[3], pos, h, hkv)\n"
        "    print(int(torch.equal(a, w) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split() == ["1", "1", "1"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16"])
def test_on_a_gpu_the_kernel_is_exact_at_stable_code_3b_heads_and_a_step_is_transformers(dtype):
    import copy

    model = _tiny(dtype).cuda()
    attn = copy.copy(model.model.layers[0].self_attn)
    attn.rotary_ndims = 20  # stable-code-3b: 25% of a head of 80
    torch_dtype = torch.bfloat16
    assert check_kernel(attn, 32, 32, 80, torch_dtype, torch.device("cuda"))
    assert check_kernel(attn, 32, 8, 80, torch_dtype, torch.device("cuda"))  # grouped-query heads
    rotary = StepRotary(model)
    assert rotary.why_not is None, rotary.why_not
    want, want_kv = _steps(model)
    got, got_kv = _steps(model, rotary)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got_kv, want_kv))


@pytest.mark.gpu
def test_on_a_gpu_a_graphed_decoder_with_it_gives_the_same_ids_and_captures():
    from codetune.export.sampling import SamplingParams, generate_ids
    from codetune.export.static_decode import Decoder
    from codetune.model.step_attention import STEP_KERNELS

    model = _tiny("bf16").cuda()
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    with_it = Decoder(model, "graph")
    without = Decoder(model, "graph", step_kernels=tuple(k for k in STEP_KERNELS if k != "fused-rotary"))
    assert with_it.attention.rotary_fused, with_it.attention.rotary.why_not
    assert "fused rotary" in with_it.describe() and not without.attention.rotary_fused
    for prompt in ([3, 14, 15, 92, 65, 35], list(range(1, 300))):
        assert list(generate_ids(model, prompt, params, 512, set(), with_it)) == \
            list(generate_ids(model, prompt, params, 512, set(), without))
    assert with_it.stats.fallback is None and with_it.stats.captured >= 1 and with_it.stats.replays > 0
