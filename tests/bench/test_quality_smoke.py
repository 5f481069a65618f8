"""The whole experiment at toy scale, as its one command: bench/quality/run.py --smoke, every codetune
command through the CLI (in one process: --in-process), then the same command again, which finds every
output made and runs nothing; then, with some outputs removed, with --jobs 2, which makes them again in
their own processes and gets the same numbers. ~60-120 s of CPU: marked slow, and it does run in CI (the
only check that the stages fit together on the machine CI has)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "bench" / "quality" / "run.py"


@pytest.mark.slow
def test_smoke_run_end_to_end_then_resumed_as_done(tmp_path):
    pytest.importorskip("sympy")  # the held-out domain (a dependency of torch, so normally present)
    out = tmp_path / "q"
    cmd = [sys.executable, str(RUN), "--out", str(out), "--smoke", "--in-process"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "report" / "results.json").read_text())
    models = ["base", "lora-bf16", "lora-last", "lora-fim0"]
    assert result["skipped"] == [{"variant": "qlora", "why": result["skipped"][0]["why"]}]
    assert "NF4" in result["skipped"][0]["why"]
    assert result["tasks"]["domain"] > 0 and result["tasks"]["general"] > 0
    for m in result["metrics"]:
        assert sorted(m["models"]) == sorted(models), m["label"]
        for v in m["models"].values():
            assert v["n"] and v["low"] <= v["value"] <= v["high"], m["label"]
    assert set(result["training"]) == {"pretrain", *models[1:]}
    assert result["training"]["lora-last"]["trainable_params"] < result["training"]["lora-bf16"]["trainable_params"]
    assert {c["against"] for c in result["changes"]} == {"base", "lora-bf16"}
    assert [e["holds"] for e in result["expectations"]][3] is None  # QLoRA: not measurable without CUDA
    md = (out / "report" / "results.md").read_text()
    assert md.startswith("# Fine-tuning quality: held-out domain `sympy` (smoke run, seed 0)") and "**Smoke run**" in md
    assert (out / "report" / "metrics.png").is_file() and (out / "report" / "training.png").is_file()
    # no held-out file is on a training side
    files = json.loads((out / "corpus" / "corpus.json").read_text())["files"]
    assert not set(files["domain-test"]) & set(files["domain-train"])
    assert not set(files["general-test"]) & set(files["pretrain"])
    sources = {json.loads(ln)["source"] for s in ("domain", "general")
               for ln in (out / "corpus" / f"tasks-{s}.jsonl").read_text().splitlines()}
    assert sources <= set(files["domain-test"]) | set(files["general-test"])

    steps = (out / "logs" / "timings.jsonl").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "logs" / "timings.jsonl").read_text() == steps  # every stage found done: nothing ran

    # --jobs: what is missing is made again, several steps at once in their own processes, with the same results
    before = {p.relative_to(out): scores(p) for p in sorted((out / "evals").rglob("results.json"))}
    for gone in ("runs/lora-last", "evals/lora-last", "evals/lora-fim0/domain", "evals/base/exec-general"):
        shutil.rmtree(out / gone)
    jobs = subprocess.run([*cmd[:-1], "--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert jobs.returncode == 0, jobs.stderr[-3000:]
    assert "finetune: 1 steps, 2 at a time" in jobs.stderr and "eval: 6 steps, 2 at a time" in jobs.stderr
    made = [json.loads(ln)["step"] for ln in (out / "logs" / "timings.jsonl").read_text().splitlines()]
    assert sorted(made[len(steps.splitlines()):]) == sorted([
        "train-lora-last", "eval-lora-last-domain", "eval-lora-last-general", "exec-lora-last-domain",
        "exec-lora-last-general", "eval-lora-fim0-domain", "exec-base-general"])
    after = {p.relative_to(out): scores(p) for p in sorted((out / "evals").rglob("results.json"))}
    assert after == before  # the retrained lora-last too: a CPU run is deterministic
    assert json.loads((out / "report" / "results.json").read_text())["metrics"] == result["metrics"]


def scores(results: Path) -> dict:
    """An eval's results.json without what names its temporary folder or times it."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("config", "seconds", "samples_per_s", "tokens_per_s")}
        return [strip(x) for x in o] if isinstance(o, list) else o
    return strip(json.loads(results.read_text()))
