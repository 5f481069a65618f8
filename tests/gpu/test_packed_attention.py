"""Packed-document attention on CUDA (model/attention.py): the variable-length flash kernel against the
per-document reference at stable-code-3b's head shape, and the fused training layer — eager and as CUDA
graphs — on a packed batch against each document run alone. (CPU: tests/model/test_attention.py.)"""

import pytest
import torch

from codetune.model import attention as A

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 32, 80), (16, 2, 128)])
def test_varlen_flash_matches_per_document_attention(heads, kv_heads, head_dim):
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    lengths = [1, 300, 0, 2047, 130, 1618]  # a zero-length slot, lengths around the kernel's 128-row blocks
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    t = int(cu[-1])
    q = torch.randn(t, heads, head_dim, device=dev, generator=g).bfloat16().requires_grad_(True)
    k, v = (torch.randn(t, kv_heads, head_dim, device=dev, generator=g).bfloat16().requires_grad_(True)
            for _ in range(2))
    grad = torch.randn(t, heads, head_dim, device=dev, generator=g).bfloat16()
    assert A._flash_usable(q, heads, kv_heads)
    out = A.document_attention(q, k, v, cu, 4096, head_dim ** -0.5)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref_out = A._per_document(q32, k32, v32, cu.tolist(), head_dim ** -0.5)
    ref = [ref_out, *torch.autograd.grad(ref_out, (q32, k32, v32), grad.float())]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 1e-2, (name, _rel(a, b))


def _tiny(dtype=torch.bfloat16):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from codetune import registry

    cfg = registry.lookup("tiny-stablelm").hf_config(512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, dtype=dtype).cuda()
    m = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return m.train()


def _packed(docs):
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = torch.cat([torch.cat([torch.roll(d, -1)[:-1], torch.tensor([-100])]) for d in docs])[None]
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_fused_layer_on_packed_batch_equals_documents_alone(graphs):
    from codetune.model.layers import graph_bank, install_layer_runners, uninstall_layer_runners
    from codetune.model.lora_fast import install_fast_lora, uninstall_fast_lora
    from codetune.model.loss import linear_cross_entropy
    from codetune.train.inputs import CausalLMLoss, batch_inputs

    m = _tiny()
    lm = m.get_base_model()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 512, (n,), generator=g) for n in (700, 1, 260, 1087)]  # 2048 tokens

    # references: each document alone through transformers' plain path, on an fp32 copy of the model (the
    # truth) and on the bf16 model itself (what bf16 rounding costs transformers' own path). The fused path
    # on the packed batch must be as close to the truth as transformers' bf16 path is: a token attending
    # across a document boundary moves the gradients far more than rounding does.
    import copy

    def per_document(model):
        base = model.get_base_model()
        total = 0.0
        for d in docs:
            b = _packed([d])
            h = base.model(input_ids=b["input_ids"].cuda()).last_hidden_state
            total = total + linear_cross_entropy(h, base.lm_head.weight, b["labels"].cuda())
        total.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return float(total), grads  # (no autograd graph may outlive its step: see the loop below)

    ref_model = copy.deepcopy(m).float()
    total, ref = per_document(ref_model)
    del ref_model
    _, ref_bf16 = per_document(m)

    prev = A.use_packed_attention(lm)
    install_fast_lora(m)
    install_layer_runners(m, checkpoint=True, offload=True, fast=True, cuda_graphs=graphs)
    loss_fn = CausalLMLoss(m)
    batch = _packed(docs)
    for _ in range(3):  # graphs: eager warm-up, capture, replay
        m.zero_grad(set_to_none=True)
        out = loss_fn(**batch_inputs(batch, torch.device("cuda")))
        out.backward()
        # the step's graph dies with the step, as in train_step: a graph kept alive across steps keeps its
        # AccumulateGrad nodes on the default stream, and a capture on the side stream then fails
        loss = float(out)
        del out
    got = {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}
    bank = graph_bank(m)
    if graphs == "on":
        assert bank is not None and bank.captured and bank.failure is None
    uninstall_layer_runners(m)
    uninstall_fast_lora(m)
    A.restore_attention(lm, prev)
    assert abs(loss - total) / total < 1e-2
    for k in ref:
        bound = max(1.5 * _rel(ref_bf16[k], ref[k]), 2e-2)
        assert _rel(got[k], ref[k]) <= bound, (k, _rel(got[k], ref[k]), _rel(ref_bf16[k], ref[k]))
