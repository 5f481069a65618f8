"""codetune export gguf, read back with the gguf package (no llama.cpp needed; test_gguf_llama_cpp.py runs the
files): the metadata llama.cpp needs, the weights as stored, the Modelfile, and nothing written over."""

import json
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from codetune import registry
from codetune.cli import main
from codetune.export.modelfile import STOPS, fim_prompt, modelfile_path, template
from codetune.export.sampling import fim_ids

Q = gguf.GGMLQuantizationType


def fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_metadata_says_what_llama_cpp_needs(merged_model, tiny_gguf):
    cfg = json.loads((merged_model / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(merged_model))
    arch = registry.MODELS["tiny-stablelm"].arch
    kv = fields(tiny_gguf["f16"])
    assert kv["general.architecture"] == "stablelm"
    # the key llama.cpp's converter leaves out: without it llama.cpp rotates with base 10,000
    assert kv["stablelm.rope.freq_base"] == arch["rope_theta"] == 1_000_000
    head_dim = arch["hidden_size"] // arch["num_attention_heads"]
    assert kv["stablelm.rope.dimension_count"] == int(arch["partial_rotary_factor"] * head_dim) == 4
    assert kv["stablelm.context_length"] == arch["max_position_embeddings"]
    assert kv["stablelm.block_count"] == arch["num_hidden_layers"]
    assert kv["stablelm.embedding_length"] == arch["hidden_size"]
    assert kv["stablelm.feed_forward_length"] == arch["intermediate_size"]
    assert kv["stablelm.attention.head_count"] == kv["stablelm.attention.head_count_kv"] == 4
    assert kv["stablelm.use_parallel_residual"] is False
    assert kv["stablelm.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    ids = {s: tok.convert_tokens_to_ids(s) for s in registry.default_tokens().all()}
    assert kv["tokenizer.ggml.fim_pre_token_id"] == ids[registry.default_tokens().fim_prefix]
    assert kv["tokenizer.ggml.fim_suf_token_id"] == ids[registry.default_tokens().fim_suffix]
    assert kv["tokenizer.ggml.fim_mid_token_id"] == ids[registry.default_tokens().fim_middle]
    assert kv["tokenizer.ggml.fim_pad_token_id"] == ids[registry.default_tokens().fim_pad]
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == ids[registry.default_tokens().eos] == 0
    assert kv["tokenizer.ggml.add_bos_token"] is False and kv["tokenizer.ggml.add_eos_token"] is False
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg["vocab_size"] > len(tok)  # padding rows are in the file
    for s, i in ids.items():
        assert tokens[i] == s and types[i] == gguf.TokenType.CONTROL
    spaces = tok.convert_tokens_to_ids(" " * 4)  # GPT-NeoX's whitespace runs: added, not special
    assert tokens[spaces] == " " * 4 and types[spaces] == gguf.TokenType.USER_DEFINED
    assert tokens[tok.convert_tokens_to_ids("Ġreturn")] == "Ġreturn"
    assert set(types[len(tok):]) == {gguf.TokenType.UNUSED}
    assert len(kv["tokenizer.ggml.merges"]) == len(json.loads((merged_model / "tokenizer.json").read_text())
                                                   ["model"]["merges"])


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_weights_are_stored_as_asked(merged_model, tiny_gguf, quant):
    weights = load_file(str(merged_model / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.STABLELM, 2)
    by_name = {names.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in weights.items()}
    tensors = {t.name: t for t in gguf.GGUFReader(str(tiny_gguf[quant])).tensors}
    assert set(tensors) == set(by_name)
    matrix = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quant]
    for name, t in tensors.items():
        want = by_name[name].float().numpy()
        if want.ndim == 1:
            expected = Q.F32  # norms and biases
        elif quant == "q8_0" and want.shape[-1] % 32:
            expected = Q.F16  # ffn_down's 172 columns are no whole number of 32-blocks
        else:
            expected = matrix
        assert t.tensor_type == expected, name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        top = np.abs(want).max()
        bound = {Q.F32: 0.0, Q.F16: 1e-3 * top, Q.BF16: 4e-3 * top, Q.Q8_0: top / 127}[expected]
        assert np.abs(got - want).max() <= bound, name


def test_modelfile_fills_the_middle_in_codetunes_order(merged_model, tiny_gguf):
    mf = modelfile_path(tiny_gguf["f16"])
    assert mf.name == "tiny-f16.Modelfile"
    lines = mf.read_text().splitlines()
    assert "FROM ./tiny-f16.gguf" in lines
    assert f'TEMPLATE """{template()}"""' in lines
    assert template() == ("{{- if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>{{ .Suffix }}<fim_middle>"
                          "{{- else }}{{ .Prompt }}{{- end }}")
    for s in STOPS:
        assert f'PARAMETER stop "{s}"' in lines
    assert set(STOPS) == set(registry.default_tokens().all())
    # what Ollama sends for (prefix, suffix) is what `codetune generate --prefix --suffix` feeds the model
    tok = AutoTokenizer.from_pretrained(str(merged_model))
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    assert tok.encode(fim_prompt(prefix, suffix), add_special_tokens=False) == fim_ids(tok, prefix, suffix)


def test_from_an_adapter_equals_from_the_merged_model(lora_adapter, tiny_gguf, tmp_path, capsys):
    out = tmp_path / "from-adapter.gguf"
    assert main(["export", "gguf", "--adapter", str(lora_adapter), "--out", str(out), "--quant", "q8_0",
                 "--device", "cpu"]) == 0
    assert "ollama create from-adapter -f" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-adapter.Modelfile", "from-adapter.gguf"]
    a = {t.name: t.data for t in gguf.GGUFReader(str(out)).tensors}
    b = {t.name: t.data for t in gguf.GGUFReader(str(tiny_gguf["q8_0"])).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_an_existing_file_is_never_written_over(merged_model, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("mine")
    assert main(["export", "gguf", "--model", str(merged_model), "--out", str(out)]) == 2
    assert "exists; codetune never writes over a file" in one_line(capsys.readouterr().err)
    assert out.read_text() == "mine"
    out.unlink()
    modelfile_path(out).write_text("my Modelfile")
    assert main(["export", "gguf", "--model", str(merged_model), "--out", str(out)]) == 2
    assert "m.Modelfile exists" in one_line(capsys.readouterr().err)
    assert modelfile_path(out).read_text() == "my Modelfile" and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["m.Modelfile"]  # no temporary folder left behind


def test_a_file_that_appears_during_the_export_is_not_replaced(merged_model, tmp_path, monkeypatch):
    from codetune.config import ConfigError
    from codetune.export import gguf_export, gguf_file

    out = tmp_path / "late.gguf"
    write = gguf_file.write_gguf

    def write_then_someone_else_writes(conv, path, name):
        write(conv, path, name)
        out.write_text("someone else's")

    monkeypatch.setattr(gguf_file, "write_gguf", write_then_someone_else_writes)  # export_gguf imports it late
    with pytest.raises(ConfigError, match="exists"):
        gguf_export.export_gguf(out, "f16", model_dir=merged_model)
    assert out.read_text() == "someone else's"
    assert sorted(os.listdir(tmp_path)) == ["late.gguf"]


@pytest.mark.parametrize("why", ["no-config", "not-gguf", "nothing", "gpt2", "missing", "bad-quant"])
def test_bad_input_is_one_line(why, merged_model, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    args = ["export", "gguf", "--model", str(merged_model), "--out", str(out)]
    if why == "no-config":
        (tmp_path / "empty").mkdir()
        args[3], want = str(tmp_path / "empty"), "not a model directory (no config.json)"
    elif why == "not-gguf":
        args[5], want = str(tmp_path / "x.bin"), "name the file *.gguf"
    elif why == "nothing":
        args, want = ["export", "gguf", "--out", str(out)], "nothing to export"
    elif why == "gpt2":
        d = tmp_path / "gpt2"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        args[3], want = str(d), "is a 'gpt2' model; codetune export gguf writes StableLM"
    elif why == "missing":
        args[3], want = str(tmp_path / "nope"), "no such folder"
    else:
        args, want = args + ["--quant", "q3"], "invalid choice: 'q3'"
    assert main(args) == 2
    assert want in one_line(capsys.readouterr().err)
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_only_gpt2_style_byte_level_bpe_is_written(tmp_path):
    from codetune.config import ConfigError
    from codetune.export.gguf_file import check_byte_level_bpe

    check_byte_level_bpe({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}},
                         tmp_path)
    for bad in ({"model": {"type": "Unigram"}, "pre_tokenizer": {"type": "Metaspace"}},
                {"model": {"type": "BPE"}, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}):
        with pytest.raises(ConfigError, match="not a GPT-2-style byte-level BPE"):
            check_byte_level_bpe(bad, tmp_path)


def test_tied_embeddings_get_an_output_matrix(merged_model, tmp_path):
    """llama.cpp's StableLM needs output.weight; a tied checkpoint has none of its own."""
    from codetune.export.gguf_export import export_gguf

    tied = tmp_path / "tied"
    tied.mkdir()
    for f in merged_model.iterdir():
        if f.name != "model.safetensors":
            (tied / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    w = load_file(str(merged_model / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v for k, v in w.items() if k != "lm_head.weight"}, str(tied / "model.safetensors"))
    out = export_gguf(tmp_path / "tied.gguf", "f32", model_dir=tied).gguf
    t = {x.name: np.array(x.data) for x in gguf.GGUFReader(str(out)).tensors}
    assert np.array_equal(t["output.weight"], t["token_embd.weight"])
    assert torch.equal(torch.from_numpy(t["token_embd.weight"]), w["model.embed_tokens.weight"])
