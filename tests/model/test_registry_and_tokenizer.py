from pathlib import Path

import pytest
import torch

from codetune import registry
from codetune.model.tokenizer import corpus_tokenizer, ensure_special_tokens


def test_stable_code_3b_shape_has_exact_parameter_count():
    from transformers import StableLmForCausalLM

    with torch.device("meta"):
        model = StableLmForCausalLM(registry.MODELS["stable-code-3b"].hf_config())
    assert sum(p.numel() for p in model.parameters()) == 2_795_443_200
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (2560, 32, 32, 6912)
    assert cfg.max_position_embeddings == 16384 and cfg.vocab_size == 50304 and not cfg.tie_word_embeddings


def test_tiny_is_same_architecture():
    spec = registry.MODELS["tiny-stablelm"]
    assert spec.arch["num_hidden_layers"] == 2 and spec.arch["hidden_size"] == 64
    assert spec.hf_config().model_type == "stablelm"


def test_special_tokens_single_ids_in_trained_bpe(stdlib):
    tok = corpus_tokenizer(sorted((stdlib / "json").glob("*.py")), vocab_size=600)
    for t in registry.default_tokens().all():
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert tok.eos_token_id == 0  # as in stable-code-3b (bos = eos = 0)


def test_special_tokens_single_ids_in_gpt_neox(shared_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    tok = ensure_special_tokens(PreTrainedTokenizerFast(tokenizer_file=str(shared_tokenizer_path)))
    ids = [tok.encode(t, add_special_tokens=False) for t in registry.default_tokens().all()]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)
    assert tok.encode("<fim_prefix>def f():<fim_suffix>", add_special_tokens=False)[0] == ids[1][0]


def test_special_tokens_are_the_model_familys(tmp_path, stdlib):
    """Asked per model: a registry entry by its family, a local directory by its config.json's model_type, a
    name codetune cannot place gets stable-code's (as before families); a saved tokenizer by what it holds."""
    from transformers import PreTrainedTokenizerFast

    stable, qwen = registry.lookup("stable-code-3b").tokens, registry.lookup("tiny-qwen2").tokens
    assert stable.fim_prefix == "<fim_prefix>" and qwen.fim_prefix == "<|fim_prefix|>"
    assert registry.special_tokens("qwen2.5-coder-1.5b") == qwen and registry.special_tokens("tiny-stablelm") == stable
    registry.lookup("tiny-qwen2").hf_config().save_pretrained(tmp_path)
    assert registry.special_tokens(str(tmp_path)) == qwen
    assert registry.special_tokens("nobody/not-a-cached-model") == stable
    tok = corpus_tokenizer(sorted((stdlib / "json").glob("*.py")), vocab_size=600, tokens=qwen)
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in qwen.all())
    assert "<fim_prefix>" not in tok.get_vocab() and registry.tokens_in(tok) == qwen
    n = len(tok)
    assert len(ensure_special_tokens(tok)) == n  # (a saved Qwen tokenizer gains no stable-code tokens)
    neox = PreTrainedTokenizerFast(tokenizer_file=str(Path(__file__).parents[1] / "fixtures" / "gpt-neox-20b.json"))
    assert registry.tokens_in(neox) == stable  # no FIM tokens of either family: the default
    # asked of the fast tokenizer's index, never of get_vocab(), which rebuilds the whole vocabulary each call
    # (serve asks for every FIM request)
    tok.get_vocab = neox.get_vocab = lambda: (_ for _ in ()).throw(AssertionError("get_vocab called"))
    assert registry.tokens_in(tok) == qwen and registry.tokens_in(neox) == stable


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_model_path_without_a_tokenizer_is_one_line(tmp_path, capsys, what):
    # (was "internal error: OSError: It looks like the config file ... is not a valid JSON file", exit 1)
    from codetune.cli import main

    where = tmp_path / "notes.txt" if what == "file" else tmp_path / "weights-only"
    where.write_text("x") if what == "file" else where.mkdir()
    assert main(["generate", "--model", str(where), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "cannot load a tokenizer from" in err and "internal error" not in err
