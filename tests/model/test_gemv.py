"""The decode step's matrix-vector kernel (model/kernels/gemv.py): its algorithm against fp64 products, the
Triton kernel against the algorithm in Triton's interpreter on the CPU where triton is installed (CI has no
triton: skipped there), and the shapes it refuses. Its speed against cuBLAS: bench/gemv_sweep.py on a GPU."""

import os
import subprocess
import sys

import pytest
import torch

from codetune.model.kernels import gemv as gk


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_the_algorithm_is_the_product_in_any_split(split_k):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 130, generator=g), torch.randn(40, 130, generator=g), torch.randn(40, generator=g)
    exact = x.double() @ w.double().T + b.double()
    got = gk.gemv_reference(x, w, b, split_k=split_k)
    assert got.dtype == torch.float32 and (got.double() - exact).abs().max() < 1e-4
    one = gk.gemv_reference(x.bfloat16(), w.bfloat16(), split_k=split_k)
    assert one.dtype == torch.bfloat16  # rounded once, to the inputs' dtype


def test_the_triton_kernel_matches_the_algorithm_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    # (a fresh interpreter: TRITON_INTERPRET is read when triton.jit wraps the kernel, at import); shapes
    # whose N and K are not multiples of the tiles, one row and several, with and without split-K and bias
    code = (
        "import torch\n"
        "from codetune.model.kernels import gemv as gk\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for rows, n, k, split, bias in ((1, 40, 96, 1, False), (3, 37, 200, 2, True), (1, 64, 130, 3, True),\n"
        "                                (5, 17, 64, 1, True)):\n"
        "    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)\n"
        "    b = torch.randn(n, generator=g) if bias else None\n"
        "    y = gk.gemv(x[None], w, b, block_n=8, block_k=32, split_k=split)\n"
        "    assert y.shape == (1, rows, n)\n"
        "    print((y[0] - gk.gemv_reference(x, w, b, split_k=split)).abs().max().item())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    errors = [float(x) for x in got.stdout.split()]
    assert len(errors) == 4 and max(errors) < 1e-4, errors


def test_more_rows_than_a_decode_batch_are_refused():
    if not gk.available():
        with pytest.raises(RuntimeError, match="needs Triton"):
            gk.gemv(torch.zeros(1, 8), torch.zeros(4, 8))
        return
    with pytest.raises(ValueError, match="at most 16 rows"):
        gk.gemv(torch.zeros(17, 8), torch.zeros(4, 8))
