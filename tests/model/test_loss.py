import pytest
import torch

from codetune.model.loss import IGNORE, linear_cross_entropy, reference_cross_entropy


@pytest.mark.parametrize("n,chunk_forced", [(37, False), (3000, True)])
def test_fused_cross_entropy_matches_reference(n, chunk_forced, monkeypatch):
    if chunk_forced:  # make several chunks, including a ragged last one
        monkeypatch.setattr("codetune.model.loss.LOGIT_CHUNK_BYTES", 4 * 700 * 128)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, 32, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(700, 32, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 700, (n,), generator=g)
    y[::5] = IGNORE
    ours = linear_cross_entropy(h, w, y)
    (gh, gw) = torch.autograd.grad(ours * 0.5, (h, w))
    ref = reference_cross_entropy(h, w, y)
    (rh, rw) = torch.autograd.grad(ref * 0.5, (h, w))
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_grad():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    loss = linear_cross_entropy(h, w, torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0
