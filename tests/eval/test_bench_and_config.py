import json
import runpy
from pathlib import Path

import pytest

from codetune.config import ConfigError, EvalConfig

BENCH = Path(__file__).resolve().parents[2] / "bench" / "humaneval_throughput.py"


def test_throughput_bench_cpu_path(tmp_path, shared_tokenizer_path):
    bench = runpy.run_path(str(BENCH))
    out = tmp_path / "r.json"
    rc = bench["main"](["--model", "tiny-stablelm", "--tokenizer", str(shared_tokenizer_path), "--out", str(out),
                        "--limit", "2", "--max-new-tokens", "4", "--no-execute"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["samples"] == 2 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
    assert r["gpu"].startswith("CPU") and "torch" in r["versions"] and "peak_reserved_gib" in r


@pytest.mark.parametrize("kwargs,match", [
    (dict(suites=["loss", "mbpp"]), "choose one or more"),
    (dict(n_samples=5, temperature=0.0), "temperature > 0"),
    (dict(compare=True), "--adapter-path"),
    (dict(timeout=0), "timeout"),
    (dict(gen_batch_size=0), "gen_batch_size"),
    (dict(fim_source="/nonexistent/dir"), "fim_source"),
])
def test_eval_config_errors_name_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EvalConfig(**kwargs).validate()


def test_memory_snapshot_sums_segments_per_pool(monkeypatch):
    """bench/memory_snapshot.py's summary of torch.cuda.memory._snapshot() (GPU-only to produce)."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # importing train_bench sets it
    mod = runpy.run_path(str(BENCH.parent / "memory_snapshot.py"))
    g = 2**30
    snap = {"segments": [
        {"segment_pool_id": (0, 0), "total_size": 2 * g, "allocated_size": g,
         "blocks": [{"state": "active_allocated", "size": g}, {"state": "inactive", "size": g}]},
        {"segment_pool_id": (1, 7), "total_size": g, "allocated_size": 0, "blocks": [{"state": "inactive", "size": g}]},
        {"segment_pool_id": (0, 0), "total_size": g, "allocated_size": g, "blocks": [{"state": "active_allocated", "size": g}]},
    ]}
    s = mod["summarize"](snap)
    assert s["ordinary"] == {"segments": 2, "reserved": 3.0, "allocated": 2.0, "largest_free_block": 1.0}
    assert s["private (1, 7)"]["reserved"] == 1.0 and s["private (1, 7)"]["allocated"] == 0.0
