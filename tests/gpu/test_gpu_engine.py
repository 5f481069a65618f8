"""GPU-only checks of the fast paths (run through the device tool; skipped in CI). Each compares the
fast path with the reference it replaces, on fresh random inputs."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _nf4_linear(out_f, in_f, seed=0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True)
    w = torch.randn(out_f, in_f) * 0.02
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return lin.cuda()


@pytest.mark.parametrize("shape", [(2560, 2560), (6912, 2560), (2560, 6912), (130, 64)])
def test_triton_nf4_dequant_equals_bitsandbytes(shape):
    import bitsandbytes.functional as bnbf

    from codetune.model.kernels.nf4 import Nf4Weight

    lin = _nf4_linear(*shape)
    ref = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(torch.bfloat16)
    src = Nf4Weight(lin.weight)
    out = src(torch.bfloat16)
    assert src.use_triton, f"Triton path fell back to bitsandbytes: {src.check}"
    exact = (out == ref).float().mean().item()
    assert exact > 0.999, f"only {exact:.4%} of values bit-identical"
    # EngineOptions(nf4_dequant="bitsandbytes") (bench/train_bench.py --nf4-dequant): bitsandbytes' own path
    from codetune.model.engine_state import EngineOptions, EngineState
    from codetune.model.lora_fast import Projections

    bnb_src = Projections([lin], EngineState(EngineOptions(nf4_dequant="bitsandbytes"))).sources[0]
    assert not bnb_src.use_triton and torch.equal(bnb_src(torch.bfloat16), ref)


def test_fast_lora_matches_peft_on_nf4():
    from peft import LoraConfig, get_peft_model

    from codetune.model.lora_fast import install_fast_lora, uninstall_fast_lora

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _nf4_linear(640, 256, seed=1)

        def forward(self, x):
            return self.proj(x)

    m = get_peft_model(Tiny(), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 100, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 100, 640, device="cuda", dtype=torch.bfloat16)

    def run():
        y = m(x)
        (y.float() * g.float()).sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.requires_grad]
        x.grad = None
        m.zero_grad()
        return y.detach().float(), grads

    y_ref, g_ref = run()
    assert install_fast_lora(m) == 1
    y_fast, g_fast = run()
    uninstall_fast_lora(m)
    rel = (y_fast - y_ref).norm() / y_ref.norm()
    assert rel < 1e-2
    for a, b in zip(g_fast, g_ref):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_offloaded_checkpoint_matches_plain_on_cuda():
    from codetune.config import AdapterConfig, ModelConfig
    from codetune.model.adapters import apply_adapters
    from codetune.model.layers import install_layer_runners, uninstall_layer_runners
    from codetune.model.load import load_model
    from codetune.model.loss import linear_cross_entropy

    base, _ = load_model(ModelConfig(model="tiny-stablelm", random_init=True, precision="bf16"),
                         torch.device("cuda"), vocab_size=512)
    m = apply_adapters(base, AdapterConfig()).train()
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 512, (2, 256), device="cuda")

    def grads():
        lm = m.get_base_model()
        loss = linear_cross_entropy(lm.model(input_ids=ids).last_hidden_state, lm.lm_head.weight, torch.roll(ids, -1, 1))
        loss.backward()
        out = [p.grad.clone() for p in m.parameters() if p.requires_grad]
        m.zero_grad()
        return out

    ref = grads()
    install_layer_runners(m, checkpoint=True, offload=True, fast=False)  # transformers' layer: bit-exact
    got = grads()
    got2 = grads()  # buffers reused on the second step
    uninstall_layer_runners(m)
    for a, b, c in zip(got, ref, got2):
        assert torch.equal(a, b) and torch.equal(c, b)


def _tiny_shards(root, stdlib, seq_len=256):
    """Shards written straight through the shard format (the device has no datasketch/detect-secrets
    for the full prepare pipeline; that pipeline is CPU code and tested in CI)."""
    import json

    from codetune.data.shards import Packer, ShardWriter
    from codetune.model.tokenizer import corpus_tokenizer, tokenizer_fingerprint

    files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))
    tok = corpus_tokenizer(files, vocab_size=2048)
    for split, part in (("train", files[1:]), ("val", files[:1])):
        p = Packer(ShardWriter(root / split, seq_len, len(tok)), tok.eos_token_id, tok.pad_token_id)
        for f in part:
            p.add_document(tok.encode(f.read_text(), add_special_tokens=False))
        p.finish()
    tok.save_pretrained(root / "tokenizer")
    (root / "manifest.json").write_text(json.dumps({"tokenizer": tokenizer_fingerprint(tok), "sources": ["stdlib"]}))


def test_nf4_training_steps_on_cuda_reduce_loss(tmp_path):
    """The real recipe, NF4 on the GPU: loss falls, checkpoint and adapter saved."""
    import sysconfig
    from pathlib import Path

    from codetune.cli import main
    from codetune.metrics import read_metrics

    data = tmp_path / "data"
    _tiny_shards(data, Path(sysconfig.get_paths()["stdlib"]))
    out = tmp_path / "run"
    assert main(["train", "--random-init", "--precision", "nf4", "--data-dir", str(data), "--seq-len", "256",
                 "--out-dir", str(out), "--steps", "30", "--batch-size", "4", "--lr", "3e-3", "--no-progress",
                 "--eval-every", "15", "--save-every", "15"]) == 0
    recs = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])
    # the same validation set at steps 15 and 30: falls only if the adapters really change what the
    # model computes (a stale fused-LoRA cache once left it flat while training "ran")
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 1e-3, val
    assert (out / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("extra", [["--optimizer", "paged_adamw_8bit"],
                                   ["--weights-max-vram", "2MiB", "--precision", "bf16"],
                                   ["--weights-max-vram", "2MiB", "--precision", "nf4"]])
def test_gpu_only_options_train(tmp_path, extra):
    """Options that only exist on a GPU: bitsandbytes' paged 8-bit AdamW, and weights placed partly in CPU
    RAM by Accelerate (a 2 MiB cap pushes most of the tiny model's layers off the GPU)."""
    import math
    import sysconfig
    from pathlib import Path

    from codetune.cli import main
    from codetune.metrics import read_metrics

    data = tmp_path / "data"
    _tiny_shards(data, Path(sysconfig.get_paths()["stdlib"]))
    out = tmp_path / "run"
    args = ["train", "--random-init", "--data-dir", str(data), "--seq-len", "256", "--out-dir", str(out),
            "--steps", "6", "--batch-size", "2", "--no-progress", "--eval-every", "0"]
    if "--precision" not in extra:
        args += ["--precision", "nf4"]
    assert main(args + extra) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


def _tiny_lora(precision, dev, model="tiny-stablelm"):
    from codetune.config import AdapterConfig, ModelConfig
    from codetune.model.adapters import apply_adapters
    from codetune.model.load import load_model

    base, _ = load_model(ModelConfig(model=model, random_init=True, precision=precision), dev,
                         vocab_size=512)
    m = apply_adapters(base, AdapterConfig()).train()
    torch.manual_seed(1)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m


@pytest.mark.parametrize("model,precision,chunked", [
    ("tiny-stablelm", "nf4", False), ("tiny-stablelm", "bf16", False), ("tiny-stablelm", "nf4", True),
    ("tiny-qwen2", "nf4", False), ("tiny-qwen2", "bf16", False)])
def test_fast_layer_on_cuda(model, precision, chunked):
    """The fused decoder layer (model/fast_layer.py) of both families (tiny-qwen2: q/k/v bias, RMSNorm, full
    rotary through the Triton kernel, grouped-query attention) on NF4/bf16 weights, packed documents,
    cuDNN/flash attention, offloaded checkpoints. bf16: no less accurate than transformers' layer against the fp32
    result of the same weights. NF4: close to transformers' layer (a wrong rotary, mask or gradient
    would be off by O(1), rounding by ~1e-2 on this tiny high-variance model)."""
    from codetune.model.engine_state import EngineOptions, EngineState
    from codetune.model.layers import decoder_layers, install_layer_runners, uninstall_layer_runners
    from codetune.model.lora_fast import install_fast_lora, uninstall_fast_lora

    # chunked: the long-context MLP path, 64 positions per chunk
    options = EngineOptions(mlp_chunk_bytes=64 * 172 * 2) if chunked else EngineOptions()
    dev = torch.device("cuda")
    m = _tiny_lora("fp32" if precision == "bf16" else precision, dev, model)
    ids = torch.randint(0, 512, (1, 256), device=dev)
    pos = torch.cat([torch.arange(100), torch.arange(156)]).to(dev)[None]
    gout = torch.randn(1, 256, 64, device=dev)

    def run(fast):
        state = EngineState(options)
        install_fast_lora(m, state) if fast else None
        install_layer_runners(m, checkpoint=True, offload=True, fast=fast, state=state)
        assert all((layer.forward.fast is not None) == fast for layer in decoder_layers(m))
        h = m.get_base_model().model(input_ids=ids, position_ids=pos).last_hidden_state
        (h.float() * gout).sum().backward()
        g = {n: p.grad.float().clone() for n, p in m.named_parameters() if p.requires_grad}
        m.zero_grad(set_to_none=True)
        uninstall_layer_runners(m)
        uninstall_fast_lora(m)
        return h.detach().float(), g

    if precision == "bf16":
        exact, g_exact = run(False)  # fp32 weights and activations
        m.to(torch.bfloat16)
        ref, g_ref = run(False)
        fast, g_fast = run(True)
        err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        assert err(fast, exact) <= 1.25 * err(ref, exact) + 1e-4, (err(fast, exact), err(ref, exact))
        for k in g_exact:
            assert err(g_fast[k], g_exact[k]) <= 1.5 * err(g_ref[k], g_exact[k]) + 1e-3, k
    else:
        ref, g_ref = run(False)
        fast, g_fast = run(True)
        assert ((fast - ref).norm() / ref.norm()) < 5e-2
        for k in g_ref:
            assert ((g_fast[k] - g_ref[k]).norm() / g_ref[k].norm()) < 1e-1, k


def test_triton_swiglu_backward_matches_autograd():
    from codetune.model.kernels.swiglu import swiglu_backward, swiglu_forward

    torch.manual_seed(0)
    y = (torch.randn(300, 2 * 1500, device="cuda") * 3).bfloat16().requires_grad_(True)
    dh = torch.randn(300, 1500, device="cuda").bfloat16()
    g, u = y[:, :1500], y[:, 1500:]
    out = torch.nn.functional.silu(g) * u
    out.backward(dh)
    torch.testing.assert_close(swiglu_forward(y.detach(), 1500), out.detach(), rtol=0, atol=0)
    ours = swiglu_backward(y.detach(), dh, 1500).float()
    ref = y.grad.float()
    # at most one bf16 ulp apart (fp32 sigmoid/exp may differ from PyTorch's in the last bit)
    assert ((ours - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
    over = y.detach().clone()  # written over its input (what the fused gate|up backward does): same bits
    assert swiglu_backward(over, dh, 1500, out=over) is over
    assert torch.equal(over.float(), ours)


# stable-code-3b's heads (32 of 80 dims, 20 rotated; MHA and GQA), Qwen2.5-Coder-1.5B's (12 over 2, all 128 rotated)
@pytest.mark.parametrize("heads,kv_heads,hd,rot_dims,inverse", [(32, 32, 80, 20, False), (32, 32, 80, 20, True),
                                                                 (32, 8, 80, 20, False), (12, 2, 128, 128, False),
                                                                 (12, 2, 128, 128, True)])
def test_triton_rotary_equals_pytorch_ops(heads, kv_heads, hd, rot_dims, inverse):
    """model/kernels/rotary_triton.py against rotary.Rotary's PyTorch path (run on the CPU): bit-identical."""
    from codetune.model.kernels.rotary import Rotary

    torch.manual_seed(0)
    b, s = 2, 300
    rot = Rotary(heads, kv_heads, hd, rot_dims)
    y = torch.randn(b * s, (heads + 2 * kv_heads) * hd).bfloat16()
    cos, sin = torch.randn(b, s, rot_dims).bfloat16(), torch.randn(b, s, rot_dims).bfloat16()
    from codetune.model.kernels.rotary_triton import rotary_triton

    ref = y.clone()
    rot.apply_(ref, cos, sin, b, inverse=inverse)  # CPU: PyTorch ops
    got = y.cuda()
    assert rotary_triton(got, cos.cuda(), sin.cuda(), b, heads + kv_heads, hd, rot_dims // 2, inverse)
    torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0)
    assert not torch.equal(ref, y)
    got2 = y.cuda()
    assert rot.check.ok is None  # (this Rotary's installation has not checked the kernel yet)
    rot.apply_(got2, cos.cuda(), sin.cuda(), b, inverse=inverse)  # the first-use self-check passes too
    assert rot.check.ok is True and torch.equal(got2.cpu(), ref), rot.check
    # separate q and k tensors (the backward's dq, dk): the same rotation, kernel and PyTorch ops alike
    q_end, k_end = heads * hd, (heads + kv_heads) * hd
    for dev in ("cuda", "cpu"):
        q, k = y[:, :q_end].clone().to(dev), y[:, q_end:k_end].clone().to(dev)
        rot.apply_qk_(q, k, cos.to(dev), sin.to(dev), b, inverse=inverse)
        assert torch.equal(q.cpu(), ref[:, :q_end]) and torch.equal(k.cpu(), ref[:, q_end:k_end]), dev


def test_cpu_embeddings_on_cuda_are_exact():
    """model/embeddings.py: the table moves to CPU RAM, lookups land on the GPU with the same bits."""
    from codetune.model.embeddings import offload_input_embeddings, restore_input_embeddings

    m = _tiny_lora("nf4", torch.device("cuda"))
    emb = m.get_input_embeddings()
    ids = torch.randint(0, 512, (2, 100), device="cuda")
    ref = emb(ids).clone()
    assert offload_input_embeddings(m) and emb.weight.device.type == "cpu"
    for batch in (ids, ids[:, :40], ids):  # reuses (and waits for) the pinned buffer
        out = emb(batch)
        assert out.is_cuda and torch.equal(out, ref[:, :batch.shape[1]])
    restore_input_embeddings(m)
    assert emb.weight.is_cuda and torch.equal(emb(ids), ref)
