"""bench/serve_latency.py end to end at toy scale: the real `codetune serve` CLI started as a subprocess,
FIM requests through the real openai client, one client then two at once; every request answered and
the numbers it reports add up (~15 s of CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_latency_reports_both_phases(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "serve_latency.py"), "--tokenizer", str(ROOT / "tests/fixtures/gpt-neox-20b.json"),
           "--model", "tiny-stablelm", "--device", "cpu", "--precision", "fp32", "--decode", "static",
           "--requests", "4", "--clients", "2", "--warmup", "1", "--prefix-tokens", "60", "--suffix-tokens", "20",
           "--new-tokens", "4", "--server-log", str(tmp_path / "serve.log")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + (tmp_path / "serve.log").read_text()[-2000:]
    one, many, server = (json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{"))
    assert one["phase"] == "one client" and many["phase"] == "2 clients"
    for r in (one, many):
        assert r["answered"] == r["requests"] == 4 and not r["failed"]
        assert 0 < r["p50_ms"] <= r["p95_ms"] and 0 < r["completion_tokens"] <= 4 * 4
        assert r["prompt_tokens"] > 60  # prefix + suffix + the FIM tokens
        # the server's Server-Timing parts: each non-negative, the total covering prompt + decode and within
        # what the client measured
        parts = r["server_p50_ms"]
        assert set(parts) == {"prepare", "prompt", "decode", "total"} and min(parts.values()) >= 0
        assert parts["prompt"] + parts["decode"] <= parts["total"] * 1.05 and r["outside_server_p50_ms"] >= 0
        assert parts["total"] <= r["p95_ms"]
    assert many["aggregate_vs_one_client"] > 0
    assert server["decoding"].startswith("codetune serve: decoding: static KV cache")  # (+ ", fused q|k|v": a plain model)
