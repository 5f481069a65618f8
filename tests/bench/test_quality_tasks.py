"""bench/quality/tasks.py: which functions become execution tasks, and that a task's recorded tests pass
on the original body and fail on wrong ones (through codetune's sandbox and judge)."""

import textwrap

import pytest
from quality import tasks

from codetune.data.decontam import Decontaminator
from codetune.eval.humaneval import task as sandbox_task
from codetune.eval.sandbox import run_checks

SOURCE = textwrap.dedent('''
    """A module of helpers."""
    import math
    import os
    from collections import Counter
    import numpy as np

    LIMIT = 10


    def digit_sum(n):
        """Sum of the decimal digits of n.

        >>> digit_sum(1234)
        10
        """
        total = 0
        for ch in str(abs(n)):
            total += int(ch)
        return total


    def most_common(seq):
        """The most frequent element of seq (the first one seen among ties)."""
        counts = Counter(seq)
        best = max(counts.values()) if counts else 0
        return next((x for x in seq if counts[x] == best), None)


    def hypot_floor(a, b):
        """floor(sqrt(a*a + b*b))."""
        r = math.sqrt(a * a + b * b)
        return math.floor(r)


    def uses_global(n):
        """Reads a module constant: not self-contained."""
        x = n + LIMIT
        return x


    def reads_file(name):
        """I/O: never a task."""
        with open(name) as f:
            return f.read()


    def uses_numpy(xs):
        """A third-party module: the sandbox's interpreter may not have it."""
        arr = np.asarray(xs)
        return arr.sum().item()


    def walks(path):
        """os is not on the safe list."""
        out = os.listdir(path)
        return out


    def no_doc(n):
        y = n * 2
        return y


    def gen(n):
        """Yields."""
        for i in range(n):
            yield i


    def star(*args):
        """Varargs."""
        total = sum(args)
        return total


    class Thing:
        def method(self, n):
            """A method, not a top-level function."""
            y = n + 1
            return y
''')


def test_candidates_are_the_self_contained_top_level_functions():
    found = {c.name: c for c in tasks.candidates(SOURCE, "pkg/mod.py")}
    assert set(found) == {"digit_sum", "most_common", "hypot_floor"}
    c = found["digit_sum"]
    assert c.imports == "" and c.params == ("n",) and c.calls == ((1234,),)
    assert c.header.startswith("def digit_sum(n):\n") and c.header.rstrip().endswith('"""')
    assert c.body.strip().startswith("total = 0") and c.indent == "    "
    assert found["most_common"].imports == "from collections import Counter"
    assert found["hypot_floor"].prompt.startswith("import math\n\n\ndef hypot_floor(a, b):")


def test_doctest_calls_need_literal_arguments_and_the_function_itself():
    assert tasks._literal_call("digit_sum(12, [1, 'a'])", "digit_sum") == (12, [1, "a"])
    assert tasks._literal_call("digit_sum(x)", "digit_sum") is None
    assert tasks._literal_call("other(1)", "digit_sum") is None
    assert tasks._literal_call("digit_sum(n=1)", "digit_sum") is None


def test_inputs_start_with_the_doctests_and_never_repeat():
    c = next(c for c in tasks.candidates(SOURCE, "pkg/mod.py") if c.name == "digit_sum")
    xs = tasks.inputs(c)
    assert xs[0] == (1234,) and len(xs) == len({repr(x) for x in xs})
    assert all(isinstance(x[0], int) for x in xs)  # `n` gets integers
    assert xs == tasks.inputs(c)  # deterministic


def test_generated_tasks_pass_on_the_original_and_fail_on_wrong_bodies():
    made = tasks.generate([("pkg/mod.py", SOURCE)], "domain", limit=10, workers=2)
    by_name = {t.entry_point: t for t in made}
    assert set(by_name) == {"digit_sum", "most_common", "hypot_floor"}
    t = by_name["digit_sum"]
    assert t.task_id == "domain/pkg/mod.py:digit_sum" and tasks.MIN_CASES <= t.cases <= tasks.MAX_CASES
    assert "((1234,), 10)" in t.test  # the doctest's call, with the output recorded from running it
    bodies = {"original": t.canonical_solution,
              "off by one": "    return sum(int(ch) for ch in str(abs(n))) + 1\n",
              "constant": "    return 10\n",
              "none": tasks.wrong_body(t)}
    results = run_checks([sandbox_task(t.problem(), body) for body in bodies.values()])
    assert {k: r.passed for k, r in zip(bodies, results)} == {
        "original": True, "off by one": False, "constant": False, "none": False}


def test_hanging_inputs_are_dropped_and_nondeterministic_outputs_never_recorded():
    src = textwrap.dedent('''
        def collatz_steps(n):
            """Steps of the 3n+1 map from n down to 1 (0 and negatives never get there)."""
            k = 0
            while n != 1:
                n = n // 2 if n % 2 == 0 else 3 * n + 1
                k += 1
            return k


        def counter(n, seen=[]):
            """Remembers every call: the same input gives another output next time."""
            seen.append(n)
            return len(seen) + n
    ''')
    made = tasks.generate([("pkg/c.py", src)], "domain", limit=5, workers=2)
    assert [t.entry_point for t in made] == ["collatz_steps"]
    assert "((0,)," not in made[0].test and "((-3,)," not in made[0].test  # (they loop forever: timed out)


def test_constant_output_functions_make_no_task():
    src = 'def always(n):\n    """Always zero."""\n    x = n\n    return 0\n'
    assert tasks.generate([("pkg/a.py", src)], "domain", limit=5, workers=1) == []


def test_test_code_compares_floats_loosely_and_containers_strictly(tmp_path):
    code = tasks.test_code([((1,), "0.1"), ((2,), "[1, 2]")])
    ns: dict = {}
    exec(code, ns)
    ns["check"](lambda n: 0.1 + 1e-15 if n == 1 else [1, 2])
    with pytest.raises(AssertionError):
        ns["check"](lambda n: 0.1 if n == 1 else (1, 2))


def test_decontam_rows_drop_a_training_file_that_holds_a_task(tmp_path):
    made = tasks.generate([("pkg/mod.py", SOURCE)], "domain", limit=1, workers=1)
    path = tmp_path / "decontam.jsonl"
    path.write_text(tasks.decontam_rows(made))
    d = Decontaminator.build(humaneval=False, files=[str(path)])
    t = made[0]
    copy = "# vendored\n" + (t.prompt + t.canonical_solution).replace("    ", "\t") + "\nX = 1\n"
    assert d.match(copy) is not None
    assert d.match("def unrelated(a):\n    return a * 2\n") is None
