"""Stage 9b-10: packing neither loses nor duplicates a token, records document starts, and the shards
read back through PackedDataset."""

import numpy as np
import pytest

from codetune.data.shards import PackedDataset, Packer, ShardWriter

EOS, PAD = 0, 1


@pytest.mark.parametrize("seq_len", [16, 64, 1000])
def test_packing_keeps_every_token_once(tmp_path, seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(2, 500, size=int(n)).tolist() for n in rng.integers(1, 150, size=60)]
    packer = Packer(ShardWriter(tmp_path / "train", seq_len, 500), EOS, PAD)
    for d in docs:
        packer.add_document(d)
    meta = packer.finish()
    ds = PackedDataset(tmp_path, "train")
    stream = np.concatenate([ds.tokens[i][: ds.n_real[i]] for i in range(len(ds))]).tolist()
    expected = [t for d in docs for t in d + [EOS]]
    assert stream == expected
    assert meta["n_tokens"] == len(expected) and meta["n_seq"] == -(-len(expected) // seq_len)
    # document starts: every place a document begins, and only those
    starts_in_stream = {0}
    pos = 0
    for d in docs:
        pos += len(d) + 1
        starts_in_stream.add(pos)
    for i in range(len(ds)):
        got = {i * seq_len + int(s) for s in ds.doc_starts(i) if s < ds.n_real[i]}
        assert got == {p for p in starts_in_stream if i * seq_len <= p < i * seq_len + ds.n_real[i]} | {i * seq_len}
    item = ds[0]
    assert set(item) >= {"input_ids", "position_ids", "labels"} and item["input_ids"].shape == (seq_len,)
