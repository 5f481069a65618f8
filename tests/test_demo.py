"""`codetune demo`, shortened: every stage runs for real and leaves its outputs where it says."""

import json

from codetune.cli import main
from codetune.train.metrics import read_metrics


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "40", "--max-files", "150", "--seq-len", "128"]) == 0
    assert json.loads((out / "data" / "manifest.json").read_text())["splits"]["train"]["n_seq"] > 0
    rows = read_metrics(out / "train" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert (out / "train" / "adapter" / "adapter_config.json").exists()
    assert (out / "merged" / "config.json").exists()
    assert "def read_config(path):" in capsys.readouterr().out
    # a second run may replace its own folder, but never a folder it didn't make
    assert main(["demo", "--out", str(out), "--steps", "2", "--max-files", "40", "--seq-len", "128"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    try:
        main(["demo", "--out", str(foreign), "--steps", "2"])
    except SystemExit as e:
        assert "not made by the demo" in str(e)
    assert (foreign / "notes.txt").read_text() == "keep me"
