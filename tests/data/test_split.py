"""Stage 7: the split keeps repositories whole when there are enough of them, falls back to directories,
then files, when there are not (one git repository: the README's own case), keeps near-duplicates
together, always honours --val-fraction, and is decided by hash alone."""

import subprocess
from pathlib import Path

import numpy as np
import pytest

from codetune.config import ConfigError, DataConfig, ModelConfig
from codetune.data import dedup, split
from codetune.data.prepare import prepare

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"
MODEL = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED))


def _keys(docs) -> np.ndarray:
    """docs: (source, repo, path) per document."""
    return np.array([split.unit_keys(s, r, p, b"").values() for s, r, p in docs], dtype=np.uint64)


def test_many_repositories_split_by_repository_and_keep_each_whole():
    docs = [("s", f"org/repo{i}", f"pkg{j % 3}/f{j}.py") for i in range(100) for j in range(5)]
    p = split.plan(_keys(docs), np.full(len(docs), 100), None, 0.2)
    assert p.unit == "repository" and abs(p.val_share - 0.2) < 0.05
    for i in range(100):
        assert len(set(p.val[i * 5:(i + 1) * 5].tolist())) == 1
    again = split.plan(_keys(docs[::-1]), np.full(len(docs), 100), None, 0.2)  # order does not matter
    assert again.val[::-1].tolist() == p.val.tolist()


def test_one_repository_falls_back_to_directory_then_file():
    by_dir = [("s", "app", f"d{i}/f{j}.py") for i in range(20) for j in range(3)]
    p = split.plan(_keys(by_dir), np.full(len(by_dir), 50), None, 0.2)
    assert p.unit == "directory" and p.units_per_level["repository"] == 1 and abs(p.val_share - 0.2) <= 0.1
    for i in range(20):
        assert len(set(p.val[i * 3:(i + 1) * 3].tolist())) == 1
    flat = [("s", "app", f"f{j}.py") for j in range(40)]
    p = split.plan(_keys(flat), np.full(40, 50), None, 0.5)
    assert p.unit == "file" and p.val_share == pytest.approx(0.5, abs=0.1)
    assert "not by 1 repository" in p.note


def test_near_duplicate_groups_stay_on_one_side():
    docs = [("s", "app", f"f{j}.py") for j in range(30)]
    groups = np.arange(30)
    groups[10:20] = 10  # ten near copies of one file
    for fraction in (0.1, 0.3, 0.5):
        p = split.plan(_keys(docs), np.full(30, 10), groups, fraction)
        assert len(set(p.val[10:20].tolist())) == 1 and p.val.any() and not p.val.all()


def test_deduper_groups_near_copies_when_not_dropping_them():
    perms = dedup.permutations(64)
    dd = dedup.Deduper(0.7, 64, drop_near=False)
    base = " ".join(f"word{i}" for i in range(300))
    texts = [base, base + " extra tail", " ".join(f"other{i}" for i in range(300)), base.replace("word7 ", "w7 ")]
    for i, t in enumerate(texts):
        assert dd.check(i, dedup.exact_key(t), dd.band_keys(dedup.signature(dedup.shingles(t), perms))) is None
    assert dd.group(1) == dd.group(3) == 0 and dd.group(2) == 2


def test_too_little_data_for_a_split_says_what_to_do():
    with pytest.raises(ConfigError, match="--val-fraction 0"):
        split.plan(_keys([("s", None, "only.py")]), np.array([100]), None, 0.05)
    p = split.plan(_keys([("s", None, "only.py")]), np.array([100]), None, 0.0)
    assert p.unit == "none" and not p.val.any() and "--val-fraction 0" in p.note


def _module(i: int) -> str:
    return "\n".join(f"def helper_{i}_{j}(values, limit={j}):\n    kept = [v for v in values if v < limit]\n"
                     f"    return sorted(kept)[:{i + j}]\n" for j in range(6))


@pytest.fixture(scope="module")
def git_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("one") / "myrepo"
    for i in range(12):
        f = repo / ("core", "cli", "util")[i % 3] / f"mod{i}.py"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(_module(i))
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    return repo


@pytest.mark.parametrize("fraction", [0.05, 0.5])
def test_one_git_repository_gets_a_validation_split(git_repo, tmp_path, fraction):
    d = DataConfig(sources=[str(git_repo)], data_dir=str(tmp_path / "data"), seq_len=64, workers=1,
                   val_fraction=fraction, write_report=fraction == 0.5)
    m = prepare(d, MODEL)
    sp = m["split"]
    assert m["splits"]["val"]["n_seq"] > 0 and m["splits"]["train"]["n_seq"] > 0
    assert sp["unit"] in ("directory", "file") and sp["units_per_level"]["repository"] == 1
    if fraction == 0.5:  # enough files for the share to come close
        assert 0.25 <= sp["val_share"] <= 0.75
        assert f"Validation by {sp['unit']}" in (tmp_path / "data" / "report.md").read_text()


def test_a_single_file_is_an_error_unless_validation_is_off(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text(_module(1))
    d = DataConfig(sources=[str(tmp_path / "src")], data_dir=str(tmp_path / "data"), seq_len=64, workers=1,
                   write_report=False)
    with pytest.raises(ConfigError, match="validation split would be empty"):
        prepare(d, MODEL)
    assert not (tmp_path / "data").exists()
    m = prepare(DataConfig(**{**d.__dict__, "val_fraction": 0.0}), MODEL)
    assert m["split"]["unit"] == "none" and m["splits"]["val"]["n_seq"] == 0
