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
