"""The fused LoRA linear against PEFT's own forward, over a bf16/fp32 base and over a bitsandbytes NF4
base (bitsandbytes' CPU backend quantizes and dequantizes NF4), forward and all gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from codetune.model.lora_fast import install_fast_lora, uninstall_fast_lora


def _nf4(out_f, in_f):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f) * 0.05, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    return lin.to("cpu")


class Two(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.up, self.down = make(96, 64), make(64, 96)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_fast_lora_equals_peft(base):
    torch.manual_seed(0)
    make = (lambda o, i: torch.nn.Linear(i, o, bias=False)) if base == "linear" else _nf4
    m = get_peft_model(Two(make), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 10, 64, requires_grad=True)

    def run():
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        g = [x.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.requires_grad]
        x.grad = None
        m.zero_grad()
        return y.detach(), g

    y_ref, g_ref = run()
    assert install_fast_lora(m) == 2
    y, g = run()
    uninstall_fast_lora(m)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fast_lora_steps_aside_for_dropout_and_disabled_adapters():
    m = get_peft_model(Two(lambda o, i: torch.nn.Linear(i, o)), LoraConfig(r=4, target_modules=["up"], lora_dropout=0.1))
    assert install_fast_lora(m) == 0  # dropout: PEFT's forward keeps the exact semantics
    m = get_peft_model(Two(lambda o, i: torch.nn.Linear(i, o)), LoraConfig(r=4, target_modules=["up"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    install_fast_lora(m)
    x = torch.randn(3, 64)
    with m.disable_adapter():
        base = m(x)
    assert not torch.allclose(base, m(x))
    uninstall_fast_lora(m)
    with m.disable_adapter():
        torch.testing.assert_close(m(x), base)


def test_projections_hold_the_built_weight_only_inside_holding():
    """The MLP's chunks build the (dequantized, concatenated) weight once per pass, not once per chunk."""
    from codetune.model.kernels.fused_lora import holding
    from codetune.model.lora_fast import Projections

    p = Projections([torch.nn.Linear(4, 3), torch.nn.Linear(4, 5)])
    a, b = p.weight(torch.float32, torch.device("cpu")), p.weight(torch.float32, torch.device("cpu"))
    assert a is not b and torch.equal(a, b)
    with holding([p]):
        c = p.weight(torch.float32, torch.device("cpu"))
        assert p.weight(torch.float32, torch.device("cpu")) is c
        assert p.weight(torch.float64, torch.device("cpu")) is not c  # another dtype is built anew
    assert p.weight(torch.float32, torch.device("cpu")) is not c and p.held is None
