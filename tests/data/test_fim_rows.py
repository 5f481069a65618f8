"""A FIM sample teaches infilling only when its prefix, suffix and middle share one packed row: documents
longer than a row are cut into chunks that fit one before FIM (fim.row_chunks), and the packer never
splits a sample that fits a row (shards.Packer). Before this, two of three samples of long files lost
their prefix to an earlier row (docs/data.md)."""

import random
from pathlib import Path

import numpy as np
import pytest

from codetune import registry
from codetune.config import DataConfig, ModelConfig
from codetune.data.fim import render, row_chunks, undo_fim
from codetune.data.pipeline import Setup, fim_samples
from codetune.data.prepare import prepare
from codetune.data.shards import PackedDataset, Packer, ShardWriter
from codetune.data.tokenize import PieceEncoder
from codetune.model.tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"
EOS, PAD, P = 0, 1, 2  # P: the id a FIM sample begins with


def _by_words(texts):
    return [len(t.split()) + 1 for t in texts]  # a stand-in tokenizer: words and the line break


def _source(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(f"{' ' * 4 * rng.randint(0, 2)}x{i} = f({', '.join('a' * rng.randint(1, 4) for _ in range(rng.randint(0, 6)))})\n"
                   for i in range(n_lines))


def test_chunks_rejoin_fit_the_budget_and_are_about_equal():
    text = _source(400, 0)
    chunks = row_chunks(text, 120, _by_words)
    assert "".join(chunks) == text and all(c.endswith("\n") for c in chunks)
    sizes = [sum(_by_words(c.splitlines(keepends=True))) for c in chunks]
    total = sum(sizes)
    assert max(sizes) <= 120 and len(chunks) <= -(-total // 120) + 1
    assert min(sizes[:-1]) >= 0.7 * total / len(chunks)  # no sliver chunks but perhaps the last
    assert row_chunks(text, 10**6, _by_words) == [text]  # fits: whole
    assert row_chunks(text, 0, _by_words) == [text]  # no row length given: never cut
    long_line = "y = [" + ", ".join(map(str, range(500))) + "]\n"
    assert "".join(row_chunks("a = 1\n" + long_line + "b = 2\n", 50, _by_words)) == "a = 1\n" + long_line + "b = 2\n"


@pytest.fixture(scope="module")
def enc_tok():
    tok = load_tokenizer(ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED)))
    tokens = registry.special_tokens("tiny-stablelm")
    enc = PieceEncoder(tok.backend_tokenizer.to_str(), {t: tok.convert_tokens_to_ids(t) for t in tokens.fim()})
    return enc, tok


def _setup(seq_len, fim_rate):
    return Setup(thresholds=None, allowed=frozenset(), redact=False, near_dedup=False, num_perm=0, shingle_size=0,
                 decontam=None, tokenizer_json="", special_ids={}, fast_tokenizer=False, fim_rate=fim_rate,
                 fim_spm_rate=0.5, seed=0, seq_len=seq_len, eos_id=0)


def test_each_chunk_is_its_own_sample_and_the_document_comes_back(enc_tok):
    enc, tok = enc_tok
    body = _source(300, 1)
    pieces, modes = fim_samples(body, "k", _setup(256, 0.5), enc)
    assert len(modes) > 3 and {"psm", "spm", "none"} <= set(modes)
    assert len(pieces) <= len(modes) and not any(a.mode == b.mode == "none" for a, b in zip(pieces, pieces[1:]))
    assert "".join(undo_fim(render(p)) for p in pieces) == body  # in order, nothing lost or repeated
    for p, ids in zip(pieces, enc.encode(pieces)):
        if p.mode != "none":
            assert len(ids) + 1 <= 256  # the sample and its EOS fit a row
    # no row length, or no FIM: one document, chosen and keyed as before
    assert fim_samples(body, "k", _setup(0, 0.5), enc)[1] in (("psm",), ("spm",), ("none",))
    assert fim_samples(body, "k", _setup(256, 0.0), enc)[1] == ("none",)


def _doc(rng, n_samples):
    """A code document as encode_batch makes it: plain runs and FIM samples; each sample inside it ends with EOS."""
    ids = []
    for j in range(n_samples):
        if rng.random() < 0.5:
            ids += rng.integers(3, 500, size=int(rng.integers(1, 60))).tolist()
        ids += [P] + rng.integers(3, 500, size=int(rng.integers(3, 60))).tolist()
        if j < n_samples - 1:
            ids.append(EOS)
    return ids


def _units(ds):
    for i in range(len(ds)):
        n = int(ds.n_real[i])
        bounds = [int(s) for s in ds.doc_starts(i) if s < n] + [n]
        for a, b in zip(bounds, bounds[1:]):
            yield ds.tokens[i][a:b].tolist()


@pytest.mark.parametrize("seq_len", [64, 200])
def test_packer_never_splits_a_sample_that_fits_and_keeps_every_token(tmp_path, seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [_doc(rng, int(rng.integers(1, 5))) for _ in range(300)]
    docs += [[P] + list(range(3, 3 + seq_len + 5))]  # longer than a row: split, and counted
    packer = Packer(ShardWriter(tmp_path / "train", seq_len, 500), EOS, PAD, fim_start=P)
    for d in docs:
        packer.add_document(d)
    meta = packer.finish()
    ds = PackedDataset(tmp_path, "train")
    units = list(_units(ds))
    samples = [u for u in units if u[0] == P]
    assert sum(u[-1] == EOS for u in samples) >= len(samples) - 1  # each whole, ending with its EOS
    assert all(P not in u[1:] for u in units)  # a unit holds at most one sample, at its start
    assert meta["fim_samples_longer_than_a_row"] == 1
    # every token once: each document's plain runs and samples, in any order
    expected = sorted(t for d in docs for t in d + [EOS])
    assert sorted(t for i in range(len(ds)) for t in ds.tokens[i][: ds.n_real[i]].tolist()) == expected
    # rows stay full: waiting samples go first into each row plain text runs on into (padding only at the end)
    assert meta["n_tokens"] == len(expected) and meta["n_seq"] <= -(-len(expected) // seq_len) + 1


def test_rows_stay_full_when_samples_are_large(tmp_path):
    """Long plain runs (1.3 rows) each followed by a sample of 0.8 rows: the room a run leaves is too small
    for the sample nearly every time, so waiting only for room in the current row piles samples up and pads
    rows for them. They go first into each row plain text runs on into instead: no padding but at the end."""
    rng, L = np.random.default_rng(1), 200
    packer = Packer(ShardWriter(tmp_path / "train", L, 500), EOS, PAD, fim_start=P)
    n = 0
    for _ in range(600):
        doc = rng.integers(3, 500, size=int(1.3 * L)).tolist() + [P] + rng.integers(3, 500, size=int(0.8 * L)).tolist()
        packer.add_document(doc)
        n += len(doc) + 1
    meta = packer.finish()
    assert meta["n_tokens"] == n and meta["n_seq"] <= -(-n // L) + 1


def test_plain_documents_pack_as_before(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(1, 150, size=60)]
    for name, start in (("a", None), ("b", P)):
        packer = Packer(ShardWriter(tmp_path / name / "train", 64, 500), EOS, PAD, fim_start=start)
        for d in docs:
            packer.add_document(d)
        packer.finish()
    a, b = PackedDataset(tmp_path / "a", "train"), PackedDataset(tmp_path / "b", "train")
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_prepared_long_files_keep_prefix_suffix_and_middle_in_one_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(_source(200 + 40 * i, 10 + i))
    out = tmp_path / "data"
    prepare(DataConfig(sources=[str(src)], data_dir=str(out), seq_len=256, val_fraction=0.0, workers=1,
                       fim_rate=0.5, near_dedup=False, decontaminate=False, redact_secrets=False, write_report=False),
            ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED)))
    tok = load_tokenizer(ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(out / "tokenizer")))
    pre, suf, mid = (tok.convert_tokens_to_ids(t) for t in registry.default_tokens().fim())
    ds = PackedDataset(out, "train")
    units = list(_units(ds))
    samples = [u for u in units if pre in u]
    assert len(samples) > 20  # every file is several rows long: several samples each
    assert "fim_samples_longer_than_a_row" not in ds.meta  # the chunks leave room for the FIM tokens and cuts
    for u in samples:  # whole: the three FIM tokens in order at the unit's start, the middle to its EOS
        assert u[0] == pre and u.index(suf) < u.index(mid) and u[-1] == tok.eos_token_id
    assert sum(u.count(mid) for u in units) == len(samples)  # no middle without its prefix and suffix
