"""CPU-side pieces of model/graphs.py (the graphs themselves need a GPU: tests/gpu/test_cuda_graphs.py)."""

import torch

from codetune.model.graphs import _flatten, _rebuild


def test_signature_keys_shapes_and_values_and_rebuild_keeps_structure():
    cos, sin, mask = torch.zeros(1, 8, 4), torch.ones(1, 8, 4), torch.ones(1, 1, 8, 8, dtype=torch.bool)
    kw = {"position_embeddings": (cos, sin), "attention_mask": mask, "use_cache": False, "cache_position": None}
    sig, tensors = _flatten(kw)
    assert tensors[0] is mask and tensors[1] is cos and tensors[2] is sin  # sorted by name
    assert _flatten({**kw, "use_cache": True})[0] != sig
    assert _flatten({**kw, "attention_mask": torch.ones(1, 1, 9, 9, dtype=torch.bool)})[0] != sig
    assert _flatten({**kw, "attention_mask": None})[0] != sig
    statics = [t.clone() for t in tensors]
    rebuilt = _rebuild(kw, statics)
    assert rebuilt["attention_mask"] is statics[0]
    assert rebuilt["position_embeddings"][0] is statics[1] and rebuilt["position_embeddings"][1] is statics[2]
    assert isinstance(rebuilt["position_embeddings"], tuple) and rebuilt["use_cache"] is False


def test_unkeyable_argument_means_no_graph():
    assert _flatten({"past_key_values": object()}) is None


def test_no_graphs_on_cpu():
    from codetune.config import AdapterConfig, ModelConfig
    from codetune.model.adapters import apply_adapters
    from codetune.model.layers import graph_bank, install_layer_runners, uninstall_layer_runners
    from codetune.model.load import load_model

    base, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True, precision="fp32"),
                         torch.device("cpu"), vocab_size=512)
    m = apply_adapters(base, AdapterConfig()).train()
    install_layer_runners(m, checkpoint=True, cuda_graphs="on")
    assert graph_bank(m) is None
    uninstall_layer_runners(m)


def test_kwargs_are_copied_only_when_they_are_new_tensors():
    from codetune.model.graphs import _Statics

    a, b = torch.ones(3), torch.full((3,), 2.0)
    s = _Statics(torch.empty(1), torch.empty(1), torch.empty(1), [torch.zeros(3)])
    s.load_kwargs([a])
    assert torch.equal(s.kw[0], a)
    a.add_(5)  # same tensor object (one forward's cos/sin across the layers): not copied again
    s.load_kwargs([a])
    assert torch.equal(s.kw[0], torch.ones(3))
    s.load_kwargs([b])
    assert torch.equal(s.kw[0], b)


def test_persistent_grads_follow_set_to_none_and_existing_grads():
    """What the graphs accumulate into: zeroed after zero_grad(set_to_none=True), seeded from a .grad set
    elsewhere, and the same tensor across steps (the graph holds its address)."""
    from codetune.model.graphs import GraphedLayer

    p, q = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
    gl = GraphedLayer(bank=None, statics=None, fn=None, params=[p, q])
    gl._attach_grads()
    buf_p, buf_q = p.grad, q.grad
    assert torch.equal(buf_p, torch.zeros(2, 2)) and torch.equal(buf_q, torch.zeros(3))
    p.grad.add_(1.0)
    q.grad.add_(2.0)
    gl._attach_grads()  # gradient accumulation: untouched
    assert torch.equal(p.grad, torch.ones(2, 2)) and p.grad is buf_p
    p.grad, q.grad = None, torch.full((3,), 7.0)  # zero_grad(set_to_none) / a grad set elsewhere
    gl._attach_grads()
    assert p.grad is buf_p and torch.equal(p.grad, torch.zeros(2, 2))
    assert q.grad is buf_q and torch.equal(q.grad, torch.full((3,), 7.0))
