"""Checkpointing, activation offload and the frozen prefix must not change the math."""

import torch

from codetune.config import AdapterConfig, ModelConfig
from codetune.model.adapters import apply_adapters
from codetune.model.layers import install_layer_runners, uninstall_layer_runners
from codetune.model.load import load_model
from codetune.model.loss import linear_cross_entropy


def _model(train_layers="all", dropout=0.0):
    base, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True), torch.device("cpu"), vocab_size=512)
    m = apply_adapters(base, AdapterConfig(train_layers=train_layers, lora_dropout=dropout))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m.train()


def _grads(m, ids, labels, seed=0):
    torch.manual_seed(seed)
    lm = m.get_base_model()
    loss = linear_cross_entropy(lm.model(input_ids=ids).last_hidden_state, lm.lm_head.weight, labels)
    loss.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    return loss.item(), g


def test_checkpoint_and_offload_give_identical_gradients():
    m = _model(dropout=0.1)  # dropout: the recompute must replay the same random mask
    ids = torch.randint(0, 512, (2, 32))
    labels = torch.roll(ids, -1, 1)
    ref_loss, ref = _grads(m, ids, labels)
    for offload in (False, True):
        install_layer_runners(m, checkpoint=True, offload=offload)
        loss, g = _grads(m, ids, labels)
        uninstall_layer_runners(m)
        assert loss == ref_loss
        for k in ref:
            torch.testing.assert_close(g[k], ref[k], rtol=0, atol=0)


def test_frozen_prefix_runs_without_autograd_and_only_last_layers_train():
    m = _model("last:1")
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)
    install_layer_runners(m, checkpoint=True)
    seen = {}
    layers = m.get_base_model().model.layers
    hook = layers[0].register_forward_hook(lambda mod, i, o: seen.update(l0=o.requires_grad))
    ids = torch.randint(0, 512, (1, 16))
    loss, g = _grads(m, ids, torch.roll(ids, -1, 1))
    hook.remove()
    assert seen["l0"] is False  # layer 0 built no graph
    assert all(v.abs().sum() > 0 for v in g.values())


def test_lora_trains_only_adapter_parameters():
    m = _model()
    install_layer_runners(m, checkpoint=True)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (2, 32))
    lm = m.get_base_model()
    linear_cross_entropy(lm.model(input_ids=ids).last_hidden_state, lm.lm_head.weight, torch.roll(ids, -1, 1)).backward()
    opt.step()
    for n, p in m.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == ("lora_" in n), n
