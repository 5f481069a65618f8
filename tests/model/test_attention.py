"""Packed-document attention (model/attention.py): no token attends across a document boundary. A packed
batch must give, token for token, the hidden states and the summed loss gradients of running each document
on its own — through transformers' layer and through the fused training layer — and no L x L mask is built.
(The CUDA flash path: tests/gpu/test_packed_attention.py.)"""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from codetune import registry
from codetune.model.attention import (
    ATTN_NAME,
    _per_document,
    document_attention,
    document_spans,
    restore_attention,
    use_packed_attention,
)
from codetune.model.layers import install_layer_runners, uninstall_layer_runners
from codetune.model.lora_fast import install_fast_lora, uninstall_fast_lora
from codetune.model.loss import linear_cross_entropy
from codetune.train.inputs import CausalLMLoss, batch_inputs


def test_spans_mark_position_restarts_and_row_starts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 0, 1, 2, 3]])  # row 2 continues a document: starts at 5
    exact = document_spans(pos)  # eager layers: one slot a document, the longest as max_length
    assert exact["cu_seq_lens_q"].dtype == torch.int32 and exact["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 12]
    assert exact["max_length_q"] == exact["max_length_k"] == 4
    static = document_spans(pos, static=True)  # CUDA graphs: power-of-two slots padded with the total, row length
    assert static["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 8, 12, 12, 12, 12] and static["max_length_q"] == 6
    one = document_spans(torch.arange(6)[None].repeat(2, 1), static=True)["cu_seq_lens_q"]
    assert one.tolist() == [0, 6] + [12] * 7  # one document a row: the same shape as a batch of 8
    many = torch.arange(40)[None] % 4  # ten documents -> 16 slots
    assert len(document_spans(many, static=True)["cu_seq_lens_q"]) == 17
    assert document_spans(many)["cu_seq_lens_q"].tolist() == list(range(0, 41, 4))
    assert document_spans(torch.arange(6)[None].repeat(2, 1)) == {}  # eager, one document a row: plain causal


def test_per_document_attention_equals_a_block_causal_mask():
    g = torch.Generator().manual_seed(0)
    cu = [0, 3, 3, 10, 16]
    q, k, v = (torch.randn(16, 4, 8, generator=g) for _ in range(3))
    seg = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 0, 7, 6]))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(_per_document(q, k, v, cu, 8 ** -0.5), ref)
    torch.testing.assert_close(document_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), 16, 8 ** -0.5), ref)



def test_attention_dropout_keeps_documents_apart():
    # (dropout > 0 used to fall back to one causal call over the whole row: documents saw each other)
    from codetune.model.attention import packed_attention

    def second_document(vscale):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 10, 8, generator=g) for _ in range(3))
        v[:, :, :4] *= vscale  # document 1 only
        spans = document_spans(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]))
        torch.manual_seed(1)
        out, _ = packed_attention(None, q, k, v, None, dropout=0.5, **spans)
        return out[0, 4:]

    torch.testing.assert_close(second_document(1.0), second_document(7.0))


def _model(**arch):
    from transformers import AutoModelForCausalLM

    cfg = registry.lookup("tiny-stablelm").hf_config(256)
    cfg._attn_implementation = "sdpa"
    for k, v in arch.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m.train()


def _per_doc_reference(m, docs):
    """Hidden states and LoRA gradients with each document run alone (plain transformers, no packing)."""
    lm = m.get_base_model()
    hs, total = [], 0.0
    for d in docs:
        h = lm.model(input_ids=d[None]).last_hidden_state
        labels = torch.roll(d, -1)[None].clone()
        labels[0, -1] = -100
        total = total + linear_cross_entropy(h, lm.lm_head.weight, labels)
        hs.append(h[0].detach())
    total.backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    return torch.cat(hs), g


def _packed_batch(docs):
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = torch.cat([torch.cat([torch.roll(d, -1)[:-1], torch.tensor([-100])]) for d in docs])[None]
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


@pytest.mark.parametrize("path", ["transformers", "fused", "fused-gqa"])
def test_packed_batch_equals_each_document_alone(path, monkeypatch):
    m = _model(num_key_value_heads=2) if path == "fused-gqa" else _model()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in (7, 1, 12, 4)]
    ref_h, ref_g = _per_doc_reference(m, docs)

    import transformers.masking_utils as mu

    def no_dense_mask(*a, **k):
        raise AssertionError("an L x L mask was built for packed documents")
    monkeypatch.setattr(mu, "sdpa_mask", no_dense_mask)
    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", no_dense_mask)
    lm = m.get_base_model()
    previous = use_packed_attention(lm)
    assert previous == "sdpa" and lm.config._attn_implementation == ATTN_NAME
    if path != "transformers":
        install_fast_lora(m)
        install_layer_runners(m, checkpoint=True, offload=False, fast=True)
    batch = _packed_batch(docs)
    loss_fn = CausalLMLoss(m)
    assert loss_fn.packed
    loss = loss_fn(**batch_inputs(batch, torch.device("cpu")))
    loss.backward()
    got_g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    with torch.no_grad():  # validation's path (model.eval(): the fused forward without autograd)
        m.eval()
        h = lm.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     **document_spans(batch["position_ids"])).last_hidden_state[0]
        m.train()
    if path != "transformers":
        uninstall_layer_runners(m)
        uninstall_fast_lora(m)
    restore_attention(lm, previous)
    assert lm.config._attn_implementation == "sdpa"
    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-5)
    assert got_g.keys() == ref_g.keys()
    for k in ref_g:
        torch.testing.assert_close(got_g[k], ref_g[k], rtol=1e-3, atol=1e-5, msg=k)


def test_models_not_on_sdpa_keep_their_attention():
    m = _model()
    lm = m.get_base_model()
    lm.config._attn_implementation = "eager"
    assert use_packed_attention(lm) is None and lm.config._attn_implementation == "eager"
    assert not CausalLMLoss(m).packed
