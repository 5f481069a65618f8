"""The kernels of model/kernels/ against their references on the CPU (the CUDA paths: tests/gpu): the fused
LoRA node against plain autograd, SwiGLU chunks, the rotary inverse, NF4's bitsandbytes fallback; and that
the package imports neither transformers nor PEFT."""

import subprocess
import sys

import pytest
import torch

from codetune.model.kernels.fused_lora import LoraParts, fused
from codetune.model.kernels.rotary import Rotary, RotaryInputs
from codetune.model.lora_fast import Projections


def test_kernels_import_neither_transformers_nor_peft():
    code = ("import sys, pkgutil, importlib, codetune.model.kernels as k\n"
            "for m in pkgutil.iter_modules(k.__path__): importlib.import_module(f'codetune.model.kernels.{m.name}')\n"
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _linears(sizes, fin, bias):
    torch.manual_seed(0)
    return [torch.nn.Linear(fin, n, bias=bias).requires_grad_(False) for n in sizes]


def _adapters(sizes, fin, r=3):
    return [(torch.randn(r, fin, requires_grad=True), torch.randn(n, r, requires_grad=True)) for n in sizes]


@pytest.mark.parametrize("epilogue", ["none", "swiglu", "rotary"])
def test_fused_node_matches_autograd(epilogue):
    """y = x [W_i]^T + b + s_i x A_i^T B_i^T, then the epilogue: values and the x, A, B gradients equal
    the same math written with plain autograd ops (fp64: only the order of sums may differ)."""
    b, s, fin, heads, kv, hd = 2, 5, 16, 2, 1, 8
    sizes = {"none": [12], "swiglu": [10, 10], "rotary": [heads * hd, kv * hd, kv * hd]}[epilogue]
    bases = [lin.double() for lin in _linears(sizes, fin, bias=epilogue == "rotary")]
    ab = [(a.detach().double().requires_grad_(), bb.detach().double().requires_grad_())
          for a, bb in _adapters(sizes, fin)]
    scales = [0.5 + i for i in range(len(sizes))]
    x = torch.randn(b, s, fin, dtype=torch.float64, requires_grad=True)
    rot = Rotary(heads, kv, hd, hd)
    cos, sin = torch.randn(b, s, hd, dtype=torch.float64), torch.randn(b, s, hd, dtype=torch.float64)
    parts = [LoraParts(base, a, bb, sc) for base, (a, bb), sc in zip(bases, ab, scales)]
    out = fused(x, Projections(bases), parts, torch.float64, epilogue,
                RotaryInputs(rot, cos, sin) if epilogue == "rotary" else None)
    out = out if isinstance(out, tuple) else (out,)

    ys = [torch.nn.functional.linear(x, base.weight, base.bias) + sc * (x @ a.t()) @ bb.t()
          for base, (a, bb), sc in zip(bases, ab, scales)]
    if epilogue == "swiglu":
        ys = [torch.nn.functional.silu(ys[0]) * ys[1]]
    elif epilogue == "rotary":  # transformers' q*cos + rotate_half(q)*sin per head, full rotary
        def rope(t, n):
            t = t.view(b, s, n, hd)
            c, si = cos[:, :, None], sin[:, :, None]
            half = torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1)
            return (t * c + half * si).reshape(b, s, n * hd)
        ys = [rope(ys[0], heads), rope(ys[1], kv), ys[2]]
    grads = [torch.randn_like(y) for y in ys]
    leaves = [x] + [t for pair in ab for t in pair]
    # (clones: the rotary backward rotates dq and dk in place, as attention's own buffers are nobody else's)
    got = torch.autograd.grad(out, leaves, [g.clone() for g in grads])
    want = torch.autograd.grad(ys, leaves, grads)
    for o, y in zip(out, ys):
        torch.testing.assert_close(o, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_chunks_equal_autograd(monkeypatch, dtype):
    """The chunked SwiGLU (model/kernels/swiglu.py, used off-CUDA and to bound 16k temporaries) is bit-exact."""
    from codetune.model.kernels import swiglu

    monkeypatch.setattr(swiglu, "_CHUNK_ELEMS", 7 * 40)  # 7 rows per chunk, 5 chunks
    torch.manual_seed(0)
    y = (torch.randn(33, 80) * 3).to(dtype).requires_grad_(True)
    dh = torch.randn(33, 40).to(dtype)
    out = torch.nn.functional.silu(y[:, :40]) * y[:, 40:]
    out.backward(dh)
    torch.testing.assert_close(swiglu.swiglu_forward(y.detach(), 40), out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(swiglu.swiglu_backward(y.detach(), dh, 40), y.grad, rtol=0, atol=0)
    over = y.detach().clone()  # out=y: the gradient written over the saved gate|up output, same values
    assert swiglu.swiglu_backward(over, dh, 40, out=over) is over
    torch.testing.assert_close(over, y.grad, rtol=0, atol=0)


def test_rotary_inverse_is_the_transpose():
    rot = Rotary(heads=3, kv_heads=3, head_dim=8, rot=4)
    b, s = 2, 5
    cos, sin = torch.randn(b, s, 4, dtype=torch.float64), torch.randn(b, s, 4, dtype=torch.float64)
    x, y = torch.randn(b * s, 3 * 3 * 8, dtype=torch.float64), torch.randn(b * s, 3 * 3 * 8, dtype=torch.float64)
    rx, rty = x.clone(), y.clone()
    rot.apply_(rx, cos, sin, b)
    rot.apply_(rty, cos, sin, b, inverse=True)
    torch.testing.assert_close((rx * y).sum(), (x * rty).sum())
    torch.testing.assert_close(rx[:, 48:], x[:, 48:], rtol=0, atol=0)  # v untouched



def test_nf4_weight_source_on_cpu_uses_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    from codetune.model.kernels.nf4 import Nf4Weight

    weight = bnb.nn.Params4bit(torch.randn(40, 64) * 0.05, requires_grad=False, quant_type="nf4",
                               compress_statistics=True)
    lin = bnb.nn.Linear4bit(64, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=True)
    lin.weight = weight
    lin = lin.to("cpu")
    src = Nf4Weight(lin.weight)
    assert not src.use_triton  # no CUDA: bitsandbytes' path
    torch.testing.assert_close(src(torch.float32), bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state))
