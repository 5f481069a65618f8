"""The exported GGUF run in llama.cpp (llama-cpp-python, built from its sdist by `pip install -e .[dev]`)
against transformers on the tiny model: same tokens, same logits, same fill-in-the-middle completion.

These run in CI. Without llama-cpp-python they fail, unless CODETUNE_SKIP_LLAMA_CPP=1 says to skip them
(a machine that cannot build it); see docs/testing.md.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from codetune import registry
from codetune.export.modelfile import fim_prompt
from codetune.export.sampling import SamplingParams, fim_ids, generate_text

SKIP_ENV = "CODETUNE_SKIP_LLAMA_CPP"
F32 = 0  # GGML_TYPE_F32: the KV cache in f32, so the f32 file is compared without f16 rounding in between
# Code with what tokenizers disagree on: whitespace runs (GPT-NeoX's added tokens), tabs, non-ASCII, digits,
# every special token, and an added token that is an ordinary word ('assistant' in GPT-NeoX-20B's file).
CODE = ("def fib(n: int) -> int:\n    \"\"\"Fibonacci, naïvely — 1, 1, 2, 3…\"\"\"\n\tif n < 2:\n"
        "        return n\n                    # 20 spaces\n    return fib(n - 1) + fib(n - 2)  # 🦙 ✅\n"
        f"{registry.default_tokens().fim_prefix}x = 12345678{registry.default_tokens().fim_suffix}\n\n\n  y = x{registry.default_tokens().fim_middle} z{registry.default_tokens().fim_pad}"
        f"'''\"\"\" assistant {registry.default_tokens().eos}<|padding|>  \n")
PREFIX = "import os\n\ndef read_config(path):\n    "
SUFFIX = "\n    return json.loads(text)\n"


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"llama-cpp-python is not installed and {SKIP_ENV}=1")
        pytest.fail(f"llama-cpp-python is not importable ({e}): pip install -e '.[dev]' builds it (docs/testing.md), "
                    f"or set {SKIP_ENV}=1 to skip these tests", pytrace=False)
    return llama_cpp


@pytest.fixture(scope="module")
def hf(merged_model):
    tok = AutoTokenizer.from_pretrained(str(merged_model))
    return AutoModelForCausalLM.from_pretrained(str(merged_model)).eval(), tok


def load(llama_cpp, path, **kw):
    return llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0, **kw)


def sample_ids(tok) -> list[int]:
    """The code above, then 160 random ids of the real vocabulary: every position of the comparison matters."""
    rand = torch.randint(0, len(tok), (160,), generator=torch.Generator().manual_seed(0)).tolist()
    return tok.encode(CODE, add_special_tokens=False) + rand


def compare(llama_cpp, hf, path, **kw):
    """(max |llama.cpp - transformers| over all logits, argmax agreement, the largest |logit|)."""
    model, tok = hf
    ids = sample_ids(tok)
    llm = load(llama_cpp, path, **kw)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(got - want).max()), float((got.argmax(-1) == want.argmax(-1)).mean()), float(np.abs(want).max())


def test_llama_cpp_tokenizes_as_the_hf_tokenizer(llama_cpp, hf, tiny_gguf):
    _, tok = hf
    llm = llama_cpp.Llama(str(tiny_gguf["f16"]), vocab_only=True, verbose=False)
    try:
        for text in (CODE, CODE.replace("\n", "\r\n"), fim_prompt(PREFIX, SUFFIX), " leading space", "x" * 300):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)
        assert llm.detokenize(tok.encode(CODE, add_special_tokens=False), special=True).decode() == CODE
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_vocab_fim_pre(vocab) == tok.convert_tokens_to_ids(registry.default_tokens().fim_prefix)
        assert llama_cpp.llama_vocab_fim_suf(vocab) == tok.convert_tokens_to_ids(registry.default_tokens().fim_suffix)
        assert llama_cpp.llama_vocab_fim_mid(vocab) == tok.convert_tokens_to_ids(registry.default_tokens().fim_middle)
        assert llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


def test_f32_logits_match_transformers(llama_cpp, hf, tiny_gguf):
    diff, agree, scale = compare(llama_cpp, hf, tiny_gguf["f32"], type_k=F32, type_v=F32)
    assert scale > 5  # logits that are not flat, or agreement would mean little
    assert diff < 1e-3 and agree == 1.0


def test_the_f32_check_catches_a_wrong_rope_base(llama_cpp, hf, merged_model, tmp_path):
    """What llama.cpp's converter writes for stable-code amounts to rope base 10,000 (the key is missing):
    the comparison above must fail on such a file."""
    from codetune.export.gguf_file import prepare_conversion, write_gguf

    conv = prepare_conversion(merged_model, "f32")
    wrong = dataclasses.replace(conv, shape=dataclasses.replace(conv.shape, rope_theta=10_000.0))
    write_gguf(wrong, tmp_path / "wrong.gguf", "wrong")
    diff, _, _ = compare(llama_cpp, hf, tmp_path / "wrong.gguf", type_k=F32, type_v=F32)
    assert diff > 0.1


# f16 weights and llama.cpp's default f16 KV cache (what a user gets): each value carries ~5e-4 relative
# rounding; measured on this model: max difference 0.15 with logits up to 12.8, argmax agreement 98.8%.
F16_MAX_DIFF = 0.3
# q8_0: llama.cpp also rounds the activations to 8 bits for q8_0 matmuls, and the tiny model's wide random init
# (0.3, the 3B's is 0.02) amplifies every rounding; measured: max difference 2.8, argmax agreement 85%. What
# is checked exactly is that the weights are llama.cpp's own q8_0 (test below).
Q8_MAX_DIFF, Q8_AGREE = 4.0, 0.8


# bf16 keeps 8 bits of mantissa to f16's 11; measured: max difference 0.83, argmax agreement 95%.
BF16_MAX_DIFF, BF16_AGREE = 1.5, 0.9


def test_f16_logits_within_bound(llama_cpp, hf, tiny_gguf):
    diff, agree, _ = compare(llama_cpp, hf, tiny_gguf["f16"])
    assert diff < F16_MAX_DIFF and agree >= 0.97


def test_bf16_logits_within_bound(llama_cpp, hf, tiny_gguf):
    diff, agree, _ = compare(llama_cpp, hf, tiny_gguf["bf16"])
    assert diff < BF16_MAX_DIFF and agree >= BF16_AGREE


def test_q8_0_is_what_llama_cpps_quantizer_makes(llama_cpp, hf, tiny_gguf, tmp_path):
    import gguf

    theirs = tmp_path / "llama-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(tiny_gguf["f32"]).encode(), str(theirs).encode(), params) == 0
    a = {t.name: t for t in gguf.GGUFReader(str(tiny_gguf["q8_0"])).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type and np.array_equal(a[name].data, b[name].data), name
    diff, agree, _ = compare(llama_cpp, hf, tiny_gguf["q8_0"])
    assert diff < Q8_MAX_DIFF and agree >= Q8_AGREE


def test_fim_prompt_completes_as_codetune_generate(llama_cpp, hf, tiny_gguf):
    """The Modelfile's rendering of (prefix, suffix), greedy through llama.cpp's own sampler, writes what
    `codetune generate --prefix --suffix` writes."""
    model, tok = hf
    want = generate_text(model, tok, fim_ids(tok, PREFIX, SUFFIX), SamplingParams(max_new_tokens=24))
    assert want.completion_tokens > 5 and want.text.strip()
    llm = load(llama_cpp, tiny_gguf["f32"], type_k=F32, type_v=F32)
    try:
        # codetune never samples the embedding's padding rows (no token has them); neither may llama.cpp here
        banned = {i: -1e30 for i in range(len(tok), llm.n_vocab())}
        got = llm.create_completion(fim_prompt(PREFIX, SUFFIX), max_tokens=24, temperature=0.0, repeat_penalty=1.0,
                                    logit_bias=banned)
    finally:
        llm.close()
    choice = got["choices"][0]
    assert choice["text"] == want.text
    assert choice["finish_reason"] == ("stop" if want.finish_reason == "stop" else "length")


def test_q4_k_m_is_quantized_by_llama_cpp(llama_cpp, hf, merged_model, tiny_gguf, tmp_path):
    import gguf

    from codetune.export.gguf_export import export_gguf

    out = export_gguf(tmp_path / "q4.gguf", "q4_k_m", model_dir=merged_model).gguf
    kv = {k: f.contents() for k, f in gguf.GGUFReader(str(out)).fields.items()}
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert kv["stablelm.rope.freq_base"] == 1_000_000  # the quantizer keeps the metadata
    assert kv["tokenizer.ggml.fim_mid_token_id"] == hf[1].convert_tokens_to_ids(registry.default_tokens().fim_middle)
    assert (tmp_path / "q4.Modelfile").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "q4.Modelfile", "q4.gguf"]
    assert out.stat().st_size < tiny_gguf["q8_0"].stat().st_size
    # (its logits are not compared: the tiny model's 64-wide rows are too narrow for q4_K's 256-blocks, so
    # llama.cpp falls back to q5_0 and the chaotic random model agrees ~37%; bench/gguf_check.py measures the 3B)
