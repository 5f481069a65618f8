"""Sources: directory walking (gitignore, vendored folders, git repositories), JSONL / Parquet columns,
and Hugging Face streaming exercised offline on a local Parquet file."""

import json
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from codetune.config import ConfigError
from codetune.data.sources import Columns, Drop, Item, check_sources, iter_source


def _items(src, cols=Columns("content")):
    return list(iter_source(str(src), cols))


def test_directory_respects_gitignore_and_skips_vendored(tmp_path):
    (tmp_path / ".gitignore").write_text("secret_build/\n*.log\n")
    for rel in ["a.py", "pkg/b.py", "x.log", "secret_build/c.py", "node_modules/d.js", "pkg/__pycache__/e.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("print(1)\n")
    paths = sorted(i.path for i in _items(tmp_path) if isinstance(i, Item))
    assert paths == [".gitignore", "a.py", "pkg/b.py"]


def test_folder_of_git_repositories_records_repo(tmp_path):
    for name in ("alpha", "beta"):
        repo = tmp_path / name
        repo.mkdir()
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        (repo / ".gitignore").write_text("ignored.py\n")
        (repo / "main.py").write_text("x = 1\n")
        (repo / "ignored.py").write_text("y = 2\n")
    items = [i for i in _items(tmp_path) if isinstance(i, Item)]
    assert sorted((i.repo, i.path) for i in items if i.path.endswith(".py")) == [
        ("alpha", "alpha/main.py"), ("beta", "beta/main.py")]


def test_symlinked_dir_is_counted_not_followed(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "loop").symlink_to(tmp_path, target_is_directory=True)
    drops = [i for i in _items(tmp_path) if isinstance(i, Drop)]
    assert [d.reason for d in drops] == ["symlinked_dir"]


def test_jsonl_columns_and_bad_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"code": "x = 1", "file": "a.py", "r": "org/x"}) + "\n{broken\n")
    out = _items(f, Columns("code", path="file", repo="r"))
    assert isinstance(out[0], Item) and (out[0].text, out[0].path, out[0].repo) == ("x = 1", "a.py", "org/x")
    assert isinstance(out[1], Drop) and out[1].reason == "bad_json"
    with pytest.raises(ConfigError, match="no column 'content'"):
        check_sources([str(f)], Columns("content"))


def _parquet(path, n=3):
    pq.write_table(pa.table({"content": [f"def f{i}():\n    return {i}\n" for i in range(n)],
                             "path": [f"f{i}.py" for i in range(n)]}), path)


def test_parquet_and_hf_streaming_read_the_same_rows(tmp_path):
    f = tmp_path / "d.parquet"
    _parquet(f)
    cols = Columns("content", path="path")
    direct = [(i.path, i.text) for i in _items(f, cols)]
    check_sources([f"hf:parquet@{f}"], cols)  # opens the stream and reads one row
    via_hf = [(i.path, i.text) for i in iter_source(f"hf:parquet@{f}", cols)]
    assert direct == via_hf and len(direct) == 3


def test_broken_parquet_is_counted(tmp_path):
    f = tmp_path / "bad.parquet"
    _parquet(f)
    data = f.read_bytes()
    f.write_bytes(data[:-40])  # footer gone: unreadable
    out = _items(f)
    assert len(out) == 1 and out[0].reason == "broken_parquet"


def test_missing_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_sources([str(tmp_path / "nope")], Columns("content"))
    with pytest.raises(ConfigError, match="no sources"):
        check_sources([], Columns("content"))
