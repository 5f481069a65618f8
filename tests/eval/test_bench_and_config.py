import json
import runpy
from pathlib import Path

import pytest
import torch

from codetune.config import ConfigError, EvalConfig

BENCH = Path(__file__).resolve().parents[2] / "bench" / "humaneval_throughput.py"


def test_throughput_bench_cpu_path(tmp_path, shared_tokenizer_path):
    bench = runpy.run_path(str(BENCH))
    out = tmp_path / "r.json"
    rc = bench["main"](["--model", "tiny-stablelm", "--tokenizer", str(shared_tokenizer_path), "--out", str(out),
                        "--limit", "2", "--max-new-tokens", "4", "--no-execute"])
    assert rc == 0
    (r,) = json.loads(out.read_text())["runs"]
    assert r["samples"] == 2 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["decode"] == "batched"
    # the machine it ran on: the CPU in CI, the GPU's name where there is one (the GPU test run, session 9)
    assert r["gpu"].startswith("CPU") != torch.cuda.is_available()
    assert "torch" in r["versions"] and "peak_reserved_gib" in r


def test_throughput_bench_compares_decode_modes(tmp_path, shared_tokenizer_path, capsys):
    bench = runpy.run_path(str(BENCH))
    out = tmp_path / "r.json"
    args = ["--model", "tiny-stablelm", "--tokenizer", str(shared_tokenizer_path), "--out", str(out),
            "--limit", "3", "--max-new-tokens", "12", "--batch-size", "2", "--no-execute"]
    assert bench["main"](args + ["--decode", "eager,batched"]) == 0
    r = json.loads(out.read_text())
    assert [x["decode"] for x in r["runs"]] == ["eager", "batched"]
    assert r["comparison"]["identical_completions"] == {"batched": True}
    assert r["comparison"]["differing_problems"] == {"batched": []} and "batched" in r["comparison"]["speedup_vs_first"]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 3  # one per mode and the comparison, each on one line for bench/run_gpu.sh
    assert bench["main"](args + ["--decode", "eager,fast"]) == 2
    assert "unknown mode fast" in capsys.readouterr().err


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


def test_memory_peak_replays_a_trace_to_its_peak(monkeypatch):
    """bench/memory_peak.py: the blocks alive at the allocated peak, grouped by our code line; reserved
    memory followed through segment events."""
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # importing train_bench sets it
    monkeypatch.syspath_prepend(str(BENCH.parent))
    mod = runpy.run_path(str(BENCH.parent / "memory_peak.py"))
    f = lambda line: [{"filename": "/x/torch/autograd.py", "line": 1, "name": "inner"},  # noqa: E731
                      {"filename": "/site/codetune/model/lora_fast.py", "line": line, "name": "forward"}]
    mb = 2**20
    trace = [{"action": "segment_map", "size": 64 * mb},
             {"action": "alloc", "addr": 1, "size": 10 * mb, "frames": f(10)},
             {"action": "alloc", "addr": 2, "size": 30 * mb, "frames": f(20)},
             {"action": "free_completed", "addr": 1, "size": 10 * mb},
             {"action": "alloc", "addr": 3, "size": 5 * mb, "frames": f(10)},
             {"action": "free_completed", "addr": 2, "size": 30 * mb},
             {"action": "alloc", "addr": 4, "size": 20 * mb, "frames": f(30)},
             {"action": "segment_unmap", "size": 32 * mb}]
    out = mod["live_at_peak"](trace, 100 * mb, 200 * mb)
    assert out["peak_mib"] == 140.0  # 100 before + 10 + 30 (then 135, then 125)
    assert out["alive_at_peak"] == [{"where": "codetune/model/lora_fast.py:20 forward", "mib": 30.0, "blocks": 1},
                                    {"where": "codetune/model/lora_fast.py:10 forward", "mib": 10.0, "blocks": 1}]
    assert out["reserved_peak_mib"] == 264.0 and out["largest_allocations"][0]["mib"] == 30.0
