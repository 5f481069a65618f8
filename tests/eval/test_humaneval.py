import time

from codetune.eval import humaneval
from codetune.eval.generation import truncate_at_stop


def test_canonical_solutions_score_164_of_164_and_empty_scores_0():
    problems = humaneval.load_problems()
    assert len(problems) == 164
    t = time.monotonic()
    records, summary = humaneval.score(problems, [[p["canonical_solution"]] for p in problems])
    elapsed = time.monotonic() - t
    failed = [(r["task_id"], r["samples"][0]["reason"]) for r in records if not r["passed"]]
    assert summary["pass@1"] == 1.0 and summary["statuses"] == {"passed": 164}, failed
    assert elapsed < 60, f"164 canonical solutions took {elapsed:.1f}s"

    records, summary = humaneval.score(problems, [[""] for _ in problems])
    assert summary["pass@1"] == 0.0 and sum(r["passed"] for r in records) == 0


def test_multiple_samples_use_the_unbiased_estimator():
    p = humaneval.load_problems(limit=2)
    good, bad = p[0]["canonical_solution"], "    return None\n"
    records, summary = humaneval.score(p, [[good, bad, bad, good], [bad, bad, bad, bad]])
    assert [r["passed"] for r in records] == [2, 0]
    # problem 0: pass@1 = 2/4, pass@... only k <= n are reported
    assert summary["pass@1"] == (0.5 + 0.0) / 2
    assert summary["samples_per_problem"] == 4


def test_stop_sequences_cut_the_completion():
    text = "    return x\n\ndef other():\n    pass\n"
    assert truncate_at_stop(text, humaneval.STOP_SEQUENCES) == "    return x\n"
    assert truncate_at_stop("    a = 1\n# comment\nif x:", humaneval.STOP_SEQUENCES) == "    a = 1"
    assert truncate_at_stop("no stop", humaneval.STOP_SEQUENCES) == "no stop"


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "x.jsonl"
    humaneval.write_jsonl(path, [{"a": 1}, {"b": 2}])
    assert path.read_text().splitlines() == ['{"a": 1}', '{"b": 2}']
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]
