"""The locally made pair set (docstring -> function) and the whole path on it: pairs + code prepared
with a mix, then trained on the tiny model through the shards' loss mask."""

import json
from pathlib import Path

import pytest

from codetune.cli import main
from codetune.config import ConfigError
from codetune.data.shards import IGNORE, PackedDataset, read_manifest
from codetune.data.stdlib_pairs import pairs_from_source, write_pairs
from codetune.metrics import read_metrics

SRC = '''
def scale(values, factor=2):
    """Multiply every value by factor and return them as a new list."""
    # a comment
    return [v * factor for v in values]

def short(x):
    """Return x."""
    return x

def _private(x):
    """A private helper that is not a public function of the module."""
    return x
'''


def test_pairs_ask_by_signature_and_docstring_and_answer_without_it():
    rows = list(pairs_from_source(SRC))
    assert len(rows) == 1
    assert rows[0]["instruction"].startswith("Write the Python function `def scale(values, factor=2)`:")
    assert "Multiply every value" in rows[0]["instruction"]
    assert rows[0]["output"] == "def scale(values, factor=2):\n    return [v * factor for v in values]\n"
    assert list(pairs_from_source("def broken(:")) == []


def test_never_writes_over_a_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("mine\n")
    with pytest.raises(ConfigError, match="exists"):
        write_pairs(f, tmp_path, 10)
    assert f.read_text() == "mine\n"


def test_pairs_and_code_prepare_and_train_end_to_end(stdlib, tmp_path, monkeypatch):
    # The pairs file by a relative name: a source's name keys which documents --mix repeats (data/mix.py),
    # so under tmp_path's changing absolute name the packed rows, and the batches, changed from run to run;
    # about 1 in 6 chat rows here is all prompt (no target), and a batch of two such rows trains nothing.
    monkeypatch.chdir(tmp_path)
    pairs = Path("pairs.jsonl")
    assert write_pairs(pairs, stdlib / "json", 40) > 5
    assert json.loads(pairs.read_text().splitlines()[0]).keys() == {"instruction", "input", "output"}
    data = tmp_path / "data"
    common = ["--random-init", "--seq-len", "128"]
    assert main(["prepare", str(stdlib / "json"), str(pairs), "--data-dir", str(data), "--mix", "code=0.6,chat=0.4",
                 "--val-fraction", "0", "--workers", "1", *common]) == 0
    man = read_manifest(data)
    assert man["counts"]["kinds"]["chat"]["kept"] > 5 and man["mix"]["requested"] == {"code": 0.6, "chat": 0.4}
    ds = PackedDataset(data, "train")
    assert ds.mask is not None
    n_loss = sum(int((ds[i]["labels"] != IGNORE).sum()) for i in range(len(ds)))
    assert n_loss < sum(int(n) for n in ds.n_real) - len(ds)  # the prompts carry none
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--out-dir", str(out), "--steps", "3", "--batch-size", "2",
                 "--eval-every", "0", "--no-progress", "--no-tensorboard", *common]) == 0
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 100 for x in losses)
