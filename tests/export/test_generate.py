"""Decoding loop (KV cache, sampling, stop strings, streaming) and the `codetune generate` command."""

import pytest
import torch
from tiny_adapter import TOKENIZER

from codetune import registry
from codetune.cli import main
from codetune.export.generate import complete
from codetune.export.sampling import SamplingParams, _held_back, fim_ids, generate_text, prompt_ids


def test_greedy_matches_transformers_generate(tuned):
    model, tok = tuned
    ids = prompt_ids(tok, "def fibonacci(n):")
    ours = generate_text(model, tok, ids, SamplingParams(max_new_tokens=12))
    ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                         pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    assert ours.text == tok.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert ours.prompt_tokens == len(ids) and ours.completion_tokens <= 12


def test_stop_string_is_cut_and_never_streamed(tuned):
    model, tok = tuned
    ids = prompt_ids(tok, "import os\n")
    full = generate_text(model, tok, ids, SamplingParams(max_new_tokens=20)).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    pieces: list[str] = []
    out = generate_text(model, tok, ids, SamplingParams(max_new_tokens=20, stop=[stop]), on_text=pieces.append)
    assert out.text == full[: full.find(stop)] and out.finish_reason == "stop"
    assert "".join(pieces) == out.text
    assert out.stop_word == stop  # (serve's /infill answers it as llama.cpp's stopping_word)


def test_held_back_text():
    assert _held_back("abc\n\nx", ["\n\ndef"]) == 0
    assert _held_back("abc\n\nd", ["\n\ndef"]) == 3
    assert _held_back("abc\n", ["\n\ndef", "zz"]) == 1


def test_seeded_sampling_repeats(tuned):
    model, tok = tuned
    ids = prompt_ids(tok, "class A:")
    p = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50)
    a = generate_text(model, tok, ids, SamplingParams(seed=3, **p)).text
    assert a == generate_text(model, tok, ids, SamplingParams(seed=3, **p)).text
    assert any(generate_text(model, tok, ids, SamplingParams(seed=s, **p)).text != a for s in range(4, 8))


def test_fim_prompt_layout(tuned):
    _, tok = tuned
    ids = fim_ids(tok, "def f():\n    ", "\n    return x\n")
    t = tok.convert_tokens_to_ids
    assert ids[0] == t(registry.default_tokens().fim_prefix) and ids[-1] == t(registry.default_tokens().fim_middle)
    assert ids.count(t(registry.default_tokens().fim_suffix)) == 1
    assert tok.decode(ids) == "<fim_prefix>def f():\n    <fim_suffix>\n    return x\n<fim_middle>"
    # a hand-built FIM prompt (as some editors send) reads the special strings as the special tokens
    assert prompt_ids(tok, "<fim_prefix>def f():\n    <fim_suffix>\n    return x\n<fim_middle>") == ids


def test_complete_for_the_demo(tuned):
    model, tok = tuned
    pieces: list[str] = []
    text = complete(model, tok, "def add(a, b):", 6, on_text=pieces.append)
    assert text == "".join(pieces)


def test_bad_sampling_setting_is_named(tuned):
    model, tok = tuned
    with pytest.raises(ValueError, match="top_p"):
        generate_text(model, tok, [1, 2], SamplingParams(top_p=0.0))


def test_cli_prompt_and_fim(lora_adapter, tmp_path, capsys):
    common = ["--adapter", str(lora_adapter), "--max-new-tokens", "5", "--device", "cpu"]
    assert main(["generate", "--prompt", "def f(", *common]) == 0
    assert "tokens in" in capsys.readouterr().err
    (tmp_path / "pre.py").write_text("def f(x):\n    ")
    assert main(["generate", "--prefix", f"@{tmp_path / 'pre.py'}", "--suffix", "\n    return y\n", *common]) == 0
    assert "finish:" in capsys.readouterr().err


def test_cli_base_model_needs_a_tokenizer(capsys):
    assert main(["generate", "--prompt", "x", "--device", "cpu"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--device", "cpu", "--max-new-tokens", "3",
                 "--tokenizer", str(TOKENIZER)]) == 0


def test_cli_refuses_prompt_with_prefix(capsys):
    assert main(["generate", "--prompt", "x", "--prefix", "y", "--device", "cpu"]) == 2
    assert "give one of --prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--chat", "y", "--device", "cpu"]) == 2


def test_chat_renders_as_prepare_rendered_the_training_rows(tuned, lora_adapter, capsys):
    """--chat feeds the model the ids `prepare` would give the same conversation up to the answer, in the
    rendering recorded with the adapter's data (plain template here: the tiny tokenizer has none)."""
    from codetune.data.chat import prompt_ids as chat_prompt_ids
    from codetune.export.generate import chat_ids

    _, tok = tuned
    msgs = [{"role": "user", "content": "Write a function that adds two numbers."}]
    for recorded, choice in ((None, "auto"), ("plain", "plain")):
        info = {"data_manifest": {"chat_template": recorded}}
        assert chat_ids(tok, msgs[0]["content"], info) == [int(i) for i in chat_prompt_ids(tok, msgs, choice)]
    assert main(["generate", "--adapter", str(lora_adapter), "--chat", msgs[0]["content"], "--device", "cpu",
                 "--max-new-tokens", "3"]) == 0
    assert "finish:" in capsys.readouterr().err


def test_streamed_text_equals_one_shot_decode(tuned):
    """Incremental decoding (multi-byte characters split across tokens included) loses nothing."""
    from codetune.export.sampling import generate_ids

    model, tok = tuned
    ids = prompt_ids(tok, "# 日本語 ☃ ")
    for seed in range(2):
        params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=seed)
        gen = [t for t in generate_ids(model, ids, params, len(tok), {tok.eos_token_id}) if t != tok.eos_token_id]
        pieces: list[str] = []
        out = generate_text(model, tok, ids, SamplingParams(max_new_tokens=30, temperature=1.0, seed=seed),
                            on_text=pieces.append)
        assert out.text == tok.decode(gen, skip_special_tokens=True) == "".join(pieces)


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["merge", "--out", "unused"]])
@pytest.mark.parametrize("text", ["{cut short", "[1, 2]"])
def test_a_broken_codetune_json_is_one_line(tmp_path, capsys, command, text):
    # (generate used to end in "internal error: JSONDecodeError"; merge had its own copy of the check)
    (tmp_path / "codetune.json").write_text(text)
    assert main([command[0], "--adapter", str(tmp_path), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert "codetune.json is not" in err and "internal error" not in err
