"""Stage 9's fast path: the tiktoken encoding built from a byte-level BPE tokenizer.json gives exactly
the ids of the Hugging Face tokenizer (special tokens as text), on real code, every kind of whitespace
run, sampled Unicode code points of every class, and FIM pieces; shards are byte-identical either way;
anything it cannot convert falls back to `tokenizers`."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from codetune.data import fastbpe
from codetune.data.fim import fim_split
from codetune.data.tokenize import PieceEncoder

STDLIB_DIRS = ("json", "email", "logging", "http", "xml", "unittest", "asyncio", "concurrent", "urllib", "importlib")


@pytest.fixture(scope="module")
def neox_json(shared_tokenizer_path):
    """The GPT-NeoX tokenizer as prepare sends it to the workers: with the FIM tokens added."""
    from codetune.config import ModelConfig
    from codetune.model.tokenizer import load_tokenizer

    tok = load_tokenizer(ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(shared_tokenizer_path)))
    return tok.backend_tokenizer.to_str()


@pytest.fixture(scope="module")
def fast(neox_json):
    fb, how = fastbpe.build(neox_json)
    assert how == "tiktoken", how
    return fb


def _same(fb, texts):
    bad = [t for t in texts if not np.array_equal(fb.encode(t), fb.hf_encode(t))]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0][:200]!r}"


def _code_texts(stdlib: Path, limit_bytes: int = 6_000_000) -> list[str]:
    out, n = [], 0
    for d in STDLIB_DIRS:
        for f in sorted((stdlib / d).rglob("*.py")):
            t = f.read_text(encoding="utf-8", errors="replace")
            out.append(t)
            n += len(t)
            if n > limit_bytes:
                return out
    return out


def test_same_ids_on_real_code(fast, stdlib):
    texts = _code_texts(stdlib)
    assert sum(map(len, texts)) > 2_000_000
    _same(fast, texts)


def test_same_ids_on_whitespace_runs_and_mixed_text(fast):
    rng = random.Random(0)
    atoms = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "x", "é",
             "1", "'s", "'ll", "(", "#", "字", "\U0001f600", "e\u0301", "<|endoftext|>", "<fim_middle>", "assistant"]
    texts = ["".join(rng.choice(atoms) * rng.choice((1, 1, 2, 7, 25, 49)) for _ in range(rng.randint(1, 60)))
             for _ in range(3000)]
    texts += [" " * n + tail for n in range(80) for tail in ("", "x", "\n", " \n", "\tx", "é")]
    _same(fast, texts)


def test_same_ids_on_sampled_code_points(fast):
    """Every code point below U+3000 (Latin, Greek, Cyrillic, Hebrew, Arabic, Indic, combining marks,
    punctuation and symbol blocks) and every 97th above, in contexts that expose its class (letter,
    number, whitespace, other) to the pre-tokenizer. The exhaustive version is test_all_code_points."""
    cps = [*range(0x3000), *range(0x3000, 0x110000, 97)]
    _same(fast, list(_code_point_chunks([c for c in cps if not 0xD800 <= c <= 0xDFFF])))


@pytest.mark.skipif(not os.environ.get("CODETUNE_SLOW_TESTS"), reason="about a minute; CODETUNE_SLOW_TESTS=1")
def test_all_code_points(fast):
    _same(fast, list(_code_point_chunks([c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF])))


def _code_point_chunks(cps, size=2048):
    for k in range(0, len(cps), size):
        yield "".join(f"a{c}a 1{c}1 !{c}! {c} {c}{c}x\n{c}\n\t{c}  {c}'" for c in map(chr, cps[k:k + size]))


def test_fim_pieces_and_special_tokens(neox_json, stdlib):
    special = {"<fim_prefix>": 7, "<fim_suffix>": 8, "<fim_middle>": 9}
    fast_enc, hf_enc = PieceEncoder(neox_json, special, fast=True), PieceEncoder(neox_json, special, fast=False)
    docs = [fim_split(t, str(i), 0.7, 0.5) for i, t in enumerate(_code_texts(stdlib, 300_000))]
    docs.append(fim_split("x = '<fim_middle>' + '<|endoftext|>'\n" * 3, "k", 1.0, 0.5))
    assert {d.mode for d in docs} == {"none", "psm", "spm"}
    for a, b in zip(fast_enc.encode(docs), hf_enc.encode(docs)):
        assert a.dtype == b.dtype == np.uint32 and np.array_equal(a, b)


def test_small_trained_bpe_converts_too(stdlib):
    """The tiny model's corpus-trained byte-level BPE (no normalizer, no added space runs)."""
    from codetune.model.tokenizer import train_bpe

    tk = train_bpe(sorted((stdlib / "json").glob("*.py")), vocab_size=1000)
    fb, how = fastbpe.build(tk.to_str())
    assert how == "tiktoken", how
    _same(fb, _code_texts(stdlib, 500_000) + fastbpe.check_texts())


def test_unconvertible_tokenizers_fall_back(neox_json, monkeypatch):
    cfg = json.loads(neox_json)
    wordpiece = {**cfg, "model": {"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"}}
    tab_token = {**cfg, "added_tokens": cfg["added_tokens"] + [
        {"id": 60000, "content": "\t\t", "special": False, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": True}]}
    lowercase = {**cfg, "normalizer": {"type": "Lowercase"}}
    dropout = {**cfg, "model": {**cfg["model"], "dropout": 0.1}}
    for bad in (wordpiece, tab_token, lowercase, dropout):
        fb, how = fastbpe.build(json.dumps(bad), verify=False)
        assert fb is None and "not faithful" in how
    monkeypatch.setenv(fastbpe.DISABLE_ENV, "0")
    assert fastbpe.build(neox_json)[0] is None


def test_a_mismatch_found_at_start_falls_back(neox_json, monkeypatch):
    monkeypatch.setattr(fastbpe.FastBPE, "encode", lambda self, text: np.zeros(1, dtype=np.uint32))
    fb, how = fastbpe.build(neox_json)
    assert fb is None and "ids differ" in how


def test_shards_are_byte_identical_with_either_encoder(tmp_path, stdlib, shared_tokenizer_path, monkeypatch):
    from codetune.config import DataConfig, ModelConfig
    from codetune.data.prepare import prepare

    model = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(shared_tokenizer_path))
    out = {}
    for name, env in (("fast", "1"), ("hf", "0")):
        monkeypatch.setenv(fastbpe.DISABLE_ENV, env)
        d = DataConfig(sources=[str(stdlib / "json"), str(stdlib / "email")], data_dir=str(tmp_path / name),
                       seq_len=256, val_fraction=0.2, workers=2, write_report=False)
        out[name] = prepare(d, model)
    assert out["fast"]["tokenizer_info"]["encoder"] == "tiktoken"
    assert out["hf"]["tokenizer_info"]["encoder"].startswith(f"{fastbpe.DISABLE_ENV}=0")
    assert out["fast"]["splits"]["train"]["n_tokens"] > 100_000
    for split in ("train", "val"):
        for f in ("tokens.bin", "doc_starts.bin", "doc_index.bin", "n_real.bin"):
            assert (tmp_path / "fast" / split / f).read_bytes() == (tmp_path / "hf" / split / f).read_bytes(), f
