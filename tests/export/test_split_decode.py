"""A static-cache decoder whose one-token steps run split-KV attention (model/step_attention.py): on the
CPU with the kernel's PyTorch form (the selection, masks, layout, and the model left as it was), on a
GPU with the Triton kernel (marker gpu: the same ids as SDPA's path, graphs captured exact)."""

import math

import pytest
import torch

from codetune.export.sampling import SamplingParams, fim_ids, generate_ids, prompt_ids
from codetune.export.static_decode import Decoder
from codetune.model.load import load_tuned
from codetune.model.step_attention import REFERENCE_NAME, SPLIT_NAME, StepAttention


def test_split_is_not_chosen_without_cuda_and_the_model_is_left_as_it_was(tuned):
    model, _ = tuned
    attention = StepAttention(model)
    assert attention.name is None and "CUDA" in attention.why_not
    assert attention.describe() == ""  # (the tuned model has LoRA on q/k/v: no fused product either)
    assert not attention.qkv_fused and "not plain linear" in attention.qkv.why_not


def test_a_decoder_on_the_split_path_gives_the_sdpa_path_s_ids(tuned):
    """The selection end to end on the CPU with the PyTorch form of the kernel: transformers hands the step
    its static-cache mask (unfilled positions masked), the output layout is what the model reads, the
    prompt's pass still runs SDPA, and the model's attention setting is back to sdpa after every pass."""
    model, tok = tuned
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    eos = {tok.eos_token_id}
    for prompt in (prompt_ids(tok, "def fibonacci(n):"), fim_ids(tok, "def add(a, b):\n    ", "\n    return c\n")):
        plain = Decoder(model, "static")
        split = Decoder(model, "static")
        split.attention = StepAttention(model, reference=True)
        assert split.attention.name == REFERENCE_NAME
        want = list(generate_ids(model, prompt, params, len(tok), eos, plain))
        got = list(generate_ids(model, prompt, params, len(tok), eos, split))
        assert got == want
        assert config._attn_implementation == "sdpa"
    # and the step's logits agree to rounding, over a cache mostly unfilled (a wrong mask would show here)
    prompt = torch.tensor([prompt_ids(tok, "import os\n")])
    plain, split = Decoder(model, "static"), Decoder(model, "static")
    split.attention = StepAttention(model, reference=True)
    logits = []
    for decoder in (plain, split):
        steps = decoder.steps(prompt.shape[1], 8)
        steps.prefill(prompt)
        logits.append(steps.step(torch.tensor([[42]])))
    assert logits[0].shape == logits[1].shape
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert not math.isclose(float(logits[0].std()), 0.0)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_triton_kernel_passes_its_check_on_stable_code_3b_heads(dtype):
    from codetune.model.step_attention import check_split

    got = check_split(32, 32, 80, dtype, torch.device("cuda"))
    assert got.ok, got


@gpu
@pytest.mark.gpu
def test_graphed_split_decoding_gives_sdpa_s_ids(lora_adapter):
    model, tok, _ = load_tuned(lora_adapter, torch.device("cuda"))
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    eos = {tok.eos_token_id}
    split, sdpa = Decoder(model, "graph"), Decoder(model, "graph", step_kernels=("flash", "efficient", "math"))
    assert split.attention.name == SPLIT_NAME, split.attention.why_not
    assert "split-KV" in split.describe() and sdpa.attention.name is None
    for prompt in (prompt_ids(tok, "def fibonacci(n):"), fim_ids(tok, "def add(a, b):\n    ", "\n    return c\n"),
                   prompt_ids(tok, "import os\n" * 60)):
        assert list(generate_ids(model, prompt, params, len(tok), eos, split)) == \
            list(generate_ids(model, prompt, params, len(tok), eos, sdpa))
    assert split.stats.fallback is None and split.stats.captured >= 1 and split.stats.replays > 0
