"""bench/decode_report.py: a call's records become the committed Markdown — which model the call ran on (a
trained model folder is named as such, not called the random-init shape), the decode table, and the FIM
agreement table of bench/decode_agreement.py with its verdict."""

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _row(**kw) -> dict:
    r = {"model": "runs/quality/pretrained", "trained": True, "precision": "bf16", "case": "b", "prompt_tokens": 32,
         "new_tokens": 128, "latency_s": 0.2, "tok_s": 640.0, "greedy_equals_eager": None, "decode_stats": {}}
    return {**r, **kw}


def _agreement(differing: int) -> dict:
    change = {"estimate": -0.01 * differing, "low": -0.05, "high": 0.03}
    kind = {"items": 100, "exact_eager": 0.31, "exact_batched": 0.31 - 0.01 * differing, "edit_similarity_eager": 0.62,
            "edit_similarity_batched": 0.61, "predictions_differing": differing, "exact_only_eager": differing,
            "exact_only_batched": 0, "exact_change": change, "edit_similarity_change": change}
    return {"modes": ["eager", "batched"], "unmatched": 0, "kinds": {"single_line": kind, "multi_line": kind},
            "same_scores": differing == 0, "no_significant_change": True}


@pytest.fixture
def render(tmp_path, monkeypatch):
    def go(results: list[dict]) -> str:
        call = tmp_path / "call1"
        call.mkdir(exist_ok=True)
        (call / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11", "transformers": "5.17",
                                                   "bitsandbytes": "0.50.2", "python": "3.12", "suite":
                                                   "bench/suites/trained-decode.txt", "commit": "abc1234"}) + "\n")
        (call / "results.jsonl").write_text("".join(json.dumps({"job": "sh x", "result": r}) + "\n" for r in results))
        monkeypatch.setattr(sys, "argv", ["decode_report.py", str(call), str(tmp_path / "rec")])
        monkeypatch.syspath_prepend(str(BENCH))
        runpy.run_path(str(BENCH / "decode_report.py"), run_name="__main__")
        assert json.loads((tmp_path / "rec.json").read_text())["calls"][0]["dir"] == "call1"
        return (tmp_path / "rec.md").read_text()
    return go


def test_a_trained_models_call_names_it_and_renders_the_fim_agreement(render):
    md = render([_row(mode="codetune-eager"), _row(mode="codetune-graph", tok_s=1280.0, greedy_equals_eager=True),
                 _agreement(differing=2)])
    assert "## Call call1: suite bench/suites/trained-decode.txt, commit abc1234" in md
    assert "Model: trained model runs/quality/pretrained." in md and "random-init stable-code-3b shape" not in md
    assert "| bf16 | b | codetune-graph | SDPA | 1,280.0 | 0.200 | 2.00× | – | identical |" in md
    assert ("| single_line | 100 | 31.0% | 29.0% | 62.0% | 61.0% | 2 | -0.020 [-0.050, +0.030] | "
            "-0.020 [-0.050, +0.030] |") in md
    assert "Verdict: no significant change." in md


def test_identical_predictions_and_old_records_without_a_model(render):
    old = _row(mode="codetune-eager")
    del old["model"], old["trained"]
    md = render([old, _agreement(differing=0)])
    assert "Model: random-init stable-code-3b shape." in md and "Verdict: identical predictions." in md


def test_each_decode_bench_process_gets_its_own_table_and_ratios(render):
    """Two decode_bench runs in one call (the split-KV / SDPA A/B): each ratio is against its own run's eager
    loop, and the attention column says which kernel each graphed step ran."""
    header = {"bench": "decode", "gpu": "NVIDIA H200"}
    md = render([header, _row(mode="codetune-eager", tok_s=50.0),
                 _row(mode="codetune-graph", tok_s=200.0, split_attention="on"),
                 header, _row(mode="codetune-eager", tok_s=40.0),
                 _row(mode="codetune-graph", tok_s=120.0, split_attention="not asked for")])
    assert "| bf16 | b | codetune-graph | split-KV | 200.0 | 0.200 | 4.00× |" in md
    assert "| bf16 | b | codetune-graph | SDPA | 120.0 | 0.200 | 3.00× |" in md
    assert md.count("| precision | case | mode | attention |") == 2
