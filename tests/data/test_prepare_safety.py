"""prepare never loses what was there: it refuses a data dir it did not make or that holds (or is inside)
a source, replaces an earlier set only by a complete non-empty one, cleans what a killed run left, turns
a full disk into one line, and names the files it wrote."""

import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codetune.atomic import aside
from codetune.cli import main
from codetune.config import ConfigError, DataConfig, ModelConfig
from codetune.data import shards
from codetune.data.outdir import clean_stale, foreign_entries, write_error
from codetune.data.prepare import prepare

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"
MODEL = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED))


def _code(i: int) -> str:
    return "\n".join(f"def f_{i}_{j}(xs, n={j}):\n    return [x * {i} for x in xs if x > n]\n" for j in range(8))


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    for i in range(4):
        (d / f"p{i % 2}").mkdir(parents=True, exist_ok=True)
        (d / f"p{i % 2}" / f"m{i}.py").write_text(_code(i))
    return d


def _data(sources, out, **kw) -> DataConfig:
    return DataConfig(sources=[str(s) for s in sources], data_dir=str(out), seq_len=64, workers=1,
                      write_report=False, val_fraction=0.3, **kw)


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli(*args) -> list[str]:
    return ["prepare", "--model", "tiny-stablelm", "--random-init", "--tokenizer", str(SHARED), "--seq-len", "64",
            "--workers", "1", *args]


# A. the data dir ------------------------------------------------------------------------------------


def test_folder_with_user_files_is_refused_unless_forced(src, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(_cli("--sources", str(src), "--data-dir", str(out))) == 2
    err = capsys.readouterr().err.strip()
    assert "notes.txt" in err and "--force" in err and "\n" not in err
    assert (out / "notes.txt").read_text() == "my notes"
    assert main(_cli("--sources", str(src), "--data-dir", str(out), "--force", "--no-write-report")) == 0
    assert (out / "manifest.json").exists() and not (out / "notes.txt").exists()
    web = tmp_path / "site"  # another program's manifest.json does not make a folder ours
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "app"}')
    assert foreign_entries(web) == ["manifest.json"] and foreign_entries(out) == []


def test_data_dir_inside_a_source_or_holding_one_is_refused(src, tmp_path):
    before = _snapshot(src)
    for out in (src, src / "p0", src / "p0" / "new"):
        with pytest.raises(ConfigError, match="source"):
            prepare(_data([src], out), MODEL)
    with pytest.raises(ConfigError, match="inside --data-dir"):  # even with --force: it would delete the source
        prepare(_data([src / "p1"], src), MODEL, force=True)
    assert _snapshot(src) == before and not (src / "p0" / "new").exists()


def test_failed_rerun_keeps_the_old_set_and_leaves_no_temp(src, tmp_path, monkeypatch):
    out = tmp_path / "data"
    prepare(_data([src], out), MODEL)
    good = _snapshot(out)

    def boom(self):
        raise RuntimeError("simulated crash while writing the new set")

    monkeypatch.setattr(shards.ShardWriter, "close", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare(_data([src], out, data_seed=1), MODEL)  # another key: a real rebuild
    assert _snapshot(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]


def test_leftovers_of_a_killed_run_are_cleaned_at_start(src, tmp_path):
    out = tmp_path / "data"
    dead = 2**22 + 12345  # above the default pid_max: no live process has it
    stale = tmp_path / f".data.tmp-{dead}"
    (stale / ".train.tmp-x").mkdir(parents=True)
    (stale / ".train.tmp-x" / "tokens.bin").write_bytes(b"\0" * 100)
    live = tmp_path / f".data.tmp-{os.getppid()}"  # a running process's temp folder is not touched
    live.mkdir()
    prepare(_data([src], out), MODEL)
    assert not stale.exists() and live.exists()

    # a swap killed between its two renames: the old set is moved back, not lost
    old = aside(out, dead)
    os.replace(out, old)
    clean_stale(out)
    assert (out / "manifest.json").exists() and not old.exists()


# B. nothing kept ------------------------------------------------------------------------------------


def test_run_where_every_input_fails_is_an_error_and_keeps_the_good_set(src, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(_cli("--sources", str(src), "--data-dir", str(out), "--no-write-report")) == 0
    good = _snapshot(out)
    truncated = tmp_path / "truncated.parquet"
    pq.write_table(pa.table({"content": [_code(9)] * 20}), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    noise = tmp_path / "noise.parquet"
    noise.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    capsys.readouterr()
    assert main(_cli("--sources", *map(str, (truncated, noise, empty, binary)), "--data-dir", str(out),
                     "--no-write-report")) == 2
    err = capsys.readouterr().err.strip()
    assert "no documents kept" in err and "broken_parquet: 2" in err and "bad_json" in err and "\n" not in err
    assert _snapshot(out) == good
    assert main(_cli("--sources", str(empty), "--data-dir", str(tmp_path / "new"))) == 2
    assert "hold no files or records" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_bad_inputs_among_good_ones_are_counted(src, tmp_path):
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64))  # a gzip header, then garbage
    man = prepare(_data([src, broken], tmp_path / "data"), MODEL)
    assert man["counts"]["kept"] == 4
    assert man["counts"]["stages"]["decode"]["dropped"] == {"broken_jsonl": 1}


# C. full or read-only disk ---------------------------------------------------------------------------


def test_full_disk_gives_one_line_and_leaves_no_temp_shard(src, tmp_path, monkeypatch):
    out = tmp_path / "data"
    prepare(_data([src], out), MODEL)
    good = _snapshot(out)
    real_open = open

    def full_disk(path, mode="r", *a, **k):  # the shards' token file lands on a full disk
        return real_open("/dev/full", mode, *a, **k) if Path(path).name == "tokens.bin" else real_open(path, mode, *a, **k)

    monkeypatch.setattr(shards, "open", full_disk, raising=False)
    monkeypatch.setattr(shards.ShardWriter, "add", _write_unbuffered(shards.ShardWriter.add))
    with pytest.raises(ConfigError) as e:
        prepare(_data([src], out, data_seed=2), MODEL)
    msg = str(e.value)
    assert "ENOSPC" in msg and "--data-dir" in msg and "left as it was" in msg and "\n" not in msg
    assert _snapshot(out) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]


def _write_unbuffered(add):
    """Fill the token file's buffer at once, as a long run would: the error then comes from a write, and
    the abort's close must flush (and fail) again."""
    def wrapped(self, *a, **k):
        add(self, *a, **k)
        self._tok.write(b"\0" * 16384)
    return wrapped


@pytest.mark.parametrize("code, cause, fix", [(errno.EROFS, "read-only", "choose another --data-dir"),
                                              (errno.EACCES, "Permission denied", "fix the folder's permissions")])
def test_read_only_or_forbidden_folder_names_cause_and_fix(tmp_path, code, cause, fix):
    out, tmp = tmp_path / "data", tmp_path / ".data.tmp-1"
    msg = str(write_error(OSError(code, os.strerror(code), str(tmp / "train")), out, tmp))
    assert cause in msg and fix in msg and errno.errorcode[code] in msg
    assert write_error(OSError(errno.EIO, "I/O error"), out, tmp) is None  # not explained: the original stands


# E. the closing summary ------------------------------------------------------------------------------


def test_summary_names_the_report_and_every_file(src, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(_cli("--sources", str(src), "--data-dir", str(out))) == 0
    text = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in text and "train/" in text and "tokenizer/" in text
    assert len(text.splitlines()) <= 5
    assert main(_cli("--sources", str(src), "--data-dir", str(out), "--json")) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["reused"] is True and str(out / "report.md") in s["files"]
    assert all(Path(f).exists() for f in s["files"])
