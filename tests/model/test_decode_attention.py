"""Split-KV decode attention (model/kernels/decode_attention.py) and its selection for a static-cache
decoder (model/step_attention.py): the algorithm against SDPA, the Triton kernel against the algorithm
(Triton's interpreter on the CPU where triton is installed; on a GPU: tests/export/test_split_decode.py),
the first-use check. A decoder on the split path: tests/export/test_split_decode.py."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from codetune.model.kernels import decode_attention as da
from codetune.model.step_attention import check_split, validate_kernels


def _inputs(b=2, h=4, hkv=2, length=300, d=80, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    for row in range(b):
        mask[row, ..., : length - 37 * (row + 1)] = True
    return q, k, v, mask


def _sdpa(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_the_split_algorithm_is_attention(splits):
    q, k, v, mask = _inputs()
    out = da.split_attention_reference(q, k, v, mask, splits=splits)
    assert out.shape == (2, 1, 4, 80)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask), atol=2e-6, rtol=1e-5)
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)  # transformers' float masks
    torch.testing.assert_close(da.split_attention_reference(q, k, v, additive, splits=splits), out)


def test_a_chunk_with_every_key_masked_weighs_nothing():
    q, k, v, mask = _inputs(b=1, length=256)
    mask[..., 40:] = False  # three of four chunks hold only masked keys
    out = da.split_attention_reference(q, k, v, mask, splits=4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _sdpa(q, k, v, mask), atol=2e-6, rtol=1e-5)


def test_splits_spread_one_query_over_the_gpu_and_cover_the_cache():
    for length, rows_heads, sms in ((4096, 32, 132), (512, 32, 132), (4096, 512, 132), (300, 8, 2), (1, 32, 132)):
        splits, chunk = da.plan_splits(length, rows_heads, sms)
        assert chunk % da.BLOCK_N == 0 and splits * chunk >= length > (splits - 1) * chunk
        assert rows_heads * splits < 4 * sms + rows_heads  # about four programs an SM, never fewer than one a head
    assert da.plan_splits(4096, 32, 132)[0] == 16  # 512 programs for stable-code-3b's 32 heads


def test_the_triton_kernel_matches_the_algorithm_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    # (a fresh interpreter: TRITON_INTERPRET is read when triton.jit wraps the kernel, at import)
    code = (
        "import torch\n"
        "from codetune.model.kernels import decode_attention as da\n"
        "from tests_inputs import make\n"
        "errors = []\n"
        "for d in (80, 112, 64):\n"
        "    q, k, v, mask = make(d)\n"
        "    ref = da.split_attention_reference(q, k, v, mask, splits=5)\n"
        "    for two in (True, False):\n"
        "        out = da.split_attention(q, k, v, mask, sms=2, two_tiles=two)\n"
        "        errors.append(float((out - ref).abs().max()))\n"
        "    fl = da.split_attention(q, k, v, torch.where(mask, 0.0, -1e30), sms=2, block_n=16, num_warps=2)\n"
        "    errors.append(float((fl - ref).abs().max()))\n"
        "print(*errors)\n")
    (tmp_path / "tests_inputs.py").write_text(
        "import torch\n"
        "def make(d):\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    q = torch.randn(2, 4, 1, d, generator=g); k = torch.randn(2, 2, 300, d, generator=g)\n"
        "    v = torch.randn(2, 2, 300, d, generator=g)\n"
        "    m = torch.zeros(2, 1, 1, 300, dtype=torch.bool); m[0, ..., :263] = True; m[1, ..., :29] = True\n"
        "    return q, k, v, m\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, str(tmp_path),
                                                                              os.environ.get("PYTHONPATH", "")]))
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    errors = [float(x) for x in got.stdout.split()]
    assert max(errors) < 1e-5, errors


def test_a_head_is_cut_into_unmasked_power_of_two_tiles_where_it_can_be():
    assert [da.head_tiles(d) for d in (64, 80, 96, 112, 128, 256)] == [(64, 0), (64, 16), (64, 32), (128, 0),
                                                                      (128, 0), (256, 0)]
    assert da.head_tiles(80, two_tiles=False) == (128, 0)  # the masked single tile (the sweep's A/B)


def test_the_first_use_check_passes_the_algorithm_and_fails_a_wrong_kernel():
    ok = check_split(4, 2, 80, torch.float32, torch.device("cpu"),
                     fn=lambda q, k, v, m, s: da.split_attention_reference(q, k, v, m, s))
    assert ok.ok and ok.split_error < 1e-5
    # a kernel that forgets the mask is off by far more than rounding
    bad = check_split(4, 2, 80, torch.float32, torch.device("cpu"),
                      fn=lambda q, k, v, m, s: da.split_attention_reference(q, k, v, None, s))
    assert not bad.ok and bad.split_error > 100 * max(bad.sdpa_error, 1e-7)


def test_kernel_sets_are_checked():
    assert validate_kernels(("split", "math")) == ("math",)
    for bad in (("split",), ("cudnn", "math"), ()):
        with pytest.raises(ValueError, match="choose from split, fused-qkv, fused-rotary, flash, efficient, math"):
            validate_kernels(bad)
