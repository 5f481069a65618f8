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
    for t in registry.SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert tok.eos_token_id == 0  # as in stable-code-3b (bos = eos = 0)


def test_special_tokens_single_ids_in_gpt_neox(shared_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    tok = ensure_special_tokens(PreTrainedTokenizerFast(tokenizer_file=str(shared_tokenizer_path)))
    ids = [tok.encode(t, add_special_tokens=False) for t in registry.SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids)
    assert tok.encode("<fim_prefix>def f():<fim_suffix>", add_special_tokens=False)[0] == ids[1][0]


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_model_path_without_a_tokenizer_is_one_line(tmp_path, capsys, what):
    # (was "internal error: OSError: It looks like the config file ... is not a valid JSON file", exit 1)
    from codetune.cli import main

    where = tmp_path / "notes.txt" if what == "file" else tmp_path / "weights-only"
    where.write_text("x") if what == "file" else where.mkdir()
    assert main(["generate", "--model", str(where), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "cannot load a tokenizer from" in err and "internal error" not in err
