"""CUDA-graphed layer passes (model/graphs.py) against the eager engine: same losses and LoRA gradients,
step after step, while the optimizer changes the adapters in place (a graph that froze a cached adapter
copy would drift from step 2 on). Run through the device tool; skipped in CI."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _model(precision, train_layers="all"):
    from codetune.config import AdapterConfig, ModelConfig
    from codetune.model.adapters import apply_adapters
    from codetune.model.load import load_model

    torch.manual_seed(0)
    base, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True, precision=precision),
                         torch.device("cuda"), vocab_size=512)
    m = apply_adapters(base, AdapterConfig(train_layers=train_layers)).train()
    torch.manual_seed(1)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m


def _train(m, graphs, schedule, options=None):
    """schedule: per optimizer step, the list of (ids, position_ids) micro-batches it accumulates."""
    from codetune.model.engine_state import EngineState
    from codetune.model.layers import graph_bank, install_layer_runners, uninstall_layer_runners
    from codetune.model.lora_fast import install_fast_lora, uninstall_fast_lora
    from codetune.model.loss import linear_cross_entropy

    start = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    state = EngineState(options)
    install_fast_lora(m, state)
    install_layer_runners(m, checkpoint=True, offload=True, fast=True, cuda_graphs=graphs, state=state)
    bank = graph_bank(m)
    params = [p for p in m.parameters() if p.requires_grad]
    # (not train/optim.py's: the engine's adapter cache must follow a fused AdamW's steps by itself)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    lm = m.get_base_model()
    losses, grads = [], []
    for batches in schedule:
        total = 0.0
        for ids, pos in batches:  # gradient accumulation over the micro-batches
            h = lm.model(input_ids=ids, position_ids=pos).last_hidden_state
            loss = linear_cross_entropy(h, lm.lm_head.weight, torch.roll(ids, -1, 1), bank) / ids.numel()
            loss.backward()
            total += loss.item()
        losses.append(total)
        grads.append([p.grad.float().clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
    uninstall_layer_runners(m)
    uninstall_fast_lora(m)
    with torch.no_grad():  # back to the same start for the other engine
        for n, p in m.named_parameters():
            if n in start:
                p.copy_(start[n])
    return losses, grads, bank


@pytest.mark.parametrize("precision,packed,train_layers,chunked",
                         [("nf4", False, "all", False), ("bf16", True, "all", False),
                          ("nf4", True, "last:1", False), ("nf4", False, "all", True)])
def test_graphs_match_eager(precision, packed, train_layers, chunked):
    from codetune.model.engine_state import EngineOptions

    # chunked: the long-context MLP path inside a graph
    options = EngineOptions(mlp_chunk_bytes=64 * 172 * 2) if chunked else None
    m = _model(precision, train_layers)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 512, (1, 256), generator=g).to(dev)
        pos = (torch.cat([torch.arange(100), torch.arange(156)]) if packed else torch.arange(256)).to(dev)[None]
        batches.append((ids, pos))
    ref_losses, ref_grads, none = _train(m, "off", [batches] * 4, options)
    assert none is None
    losses, grads, bank = _train(m, "on", [batches] * 4, options)
    assert bank is not None and bank.failure is None, bank and bank.failure
    assert bank.captured > 0
    assert any(e["graph"] is not None for c in bank.calls.values() for e in c.entries.values())  # the loss too
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)
    for step, (ga, gb) in enumerate(zip(grads, ref_grads)):
        for x, y in zip(ga, gb):
            assert ((x - y).norm() / y.norm().clamp(min=1e-12)).item() < 1e-3, step
    # the adapters really moved: a graph replaying step 0's adapters would have matched only step 0
    assert abs(losses[-1] - losses[0]) > 1e-3


def test_new_shape_drops_old_graphs():
    """A second sequence length drops the first one's graphs (one shape's pool at a time) and stays exact."""
    m = _model("nf4")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    mk = lambda n: [(torch.randint(0, 512, (1, n), generator=g).to(dev), torch.arange(n, device=dev)[None])]  # noqa: E731
    long_b, short_b = mk(256), mk(128)
    schedule = [long_b] * 3 + [short_b] * 3 + [long_b] * 2
    ref, _, _ = _train(m, "off", schedule)
    got, _, bank = _train(m, "on", schedule)
    assert bank.failure is None and bank.generation == 2 and bank.shape == (1, 256)
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-4 * abs(b), (got, ref)
