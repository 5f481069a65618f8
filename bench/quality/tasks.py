"""Function-completion tasks with unit tests, for the execution-based score. They are made first, from
all of the domain's (and the general side's) files; the files they come from are then held out
(corpus.split), and every training set drops any file holding a copy of one (decontam_rows).

A task is a top-level function that can run on its own: a docstring, a body of 2-30 lines, positional
parameters only, and no name beyond its parameters, its locals, safe built-ins and
modules of the standard library that its file imports (those imports go into the prompt). The prompt is
the imports + signature + docstring, as in HumanEval; the model writes the body.

The tests are recorded input/output pairs: the inputs are the function's own doctest calls with literal
arguments, then small values chosen by the parameters' names (n -> ints, s -> strings, seq -> lists);
the original is run on them in codetune's sandbox, twice, and a call counts only if it returned the
same plain value (None, bool, int, finite float, str, list, tuple, dict, set) both times within 0.2 s.
A task is kept with at least MIN_CASES such calls and MIN_DISTINCT different outputs (so no body with
fewer possible results passes, a constant least of all), and only after the sandbox's judge has passed
the original body and failed `return None`.
"""

from __future__ import annotations

import ast
import builtins
import doctest
import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

SAFE_MODULES = frozenset({
    "math", "cmath", "itertools", "functools", "collections", "operator", "re", "string", "heapq", "bisect",
    "fractions", "decimal", "statistics", "textwrap", "copy", "keyword", "unicodedata", "struct", "numbers",
    "typing", "difflib", "calendar", "datetime", "enum"})
# built-ins a self-contained pure function has no business calling (I/O, code execution, introspection)
UNSAFE_BUILTINS = frozenset({
    "open", "exec", "eval", "compile", "__import__", "input", "print", "globals", "locals", "vars", "setattr",
    "delattr", "breakpoint", "exit", "quit", "help", "memoryview", "super", "__build_class__", "object"})
SAFE_BUILTINS = frozenset(dir(builtins)) - UNSAFE_BUILTINS
MIN_BODY_LINES, MAX_BODY_LINES = 2, 30
MAX_PARAMS = 4
MIN_CASES, MAX_CASES = 3, 8
MIN_DISTINCT = 3  # different expected outputs: a body that special-cases one input still fails
FUZZ_TRIES = 24
MAX_REPR = 100  # longer outputs are not kept as expected values (and would overflow the sandbox's output)
RESULT_MARK = "@@cases@@"

INTS = (0, 1, 2, 3, 4, 5, 7, 10, 12, -3, 100)
STRS = ("", "a", "abc", "hello world", "Hello, World!", "a_b_c", "123", "x y z")
LISTS = ([], [1], [1, 2, 3], [3, 1, 2], [2, 2, 5, 1], [0, -1, 4, 4, 9], ["b", "a", "c"], [[1, 2], [3]])
FLOATS = (0.5, 1.0, 2.5, -1.25)
OTHER = (None, True, False, (1, 2), (3, 1, 2), {"a": 1, "b": 2})
INT_NAMES = {"n", "k", "m", "i", "j", "num", "count", "size", "length", "width", "depth", "level", "p", "q",
             "base", "start", "stop", "step", "index", "idx", "degree", "order", "prec", "bits", "digits"}
STR_NAMES = {"s", "string", "text", "name", "word", "line", "prefix", "suffix", "sep", "char", "c", "pattern",
             "key", "label", "msg", "fmt", "symbol", "expr_str", "st"}
LIST_NAMES = {"seq", "lst", "items", "l", "arr", "values", "iterable", "data", "elements", "nums", "numbers", "xs",
              "it", "sequence", "terms", "vec", "v", "coeffs", "perm", "li", "array", "lists", "pairs", "args"}


@dataclass(frozen=True)
class Candidate:
    name: str
    source: str    # file key (package/path) it comes from
    imports: str   # the standard-library import lines it needs
    header: str    # signature + docstring, as written
    body: str      # the original body
    indent: str    # of the body
    params: tuple[str, ...]  # the ones without a default: what the inputs fill
    calls: tuple[tuple, ...]  # argument tuples of its doctests

    @property
    def prompt(self) -> str:
        return (self.imports + "\n\n\n" if self.imports else "") + self.header


@dataclass(frozen=True)
class ExecTask:
    """One problem in HumanEval's shape (codetune.eval.humaneval scores it)."""
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str
    cases: int
    source: str

    def problem(self) -> dict:
        return asdict(self)


def _imports(tree: ast.Module) -> dict[str, str]:
    """name bound at module level -> the import line binding it, for standard-library modules only."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in SAFE_MODULES:
                    bound = a.asname or a.name.split(".")[0]
                    out[bound] = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in SAFE_MODULES:
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"from {node.module} import {a.name}" + (f" as {a.asname}" if a.asname else "")
    return out


def _free_names(fn: ast.FunctionDef) -> set[str] | None:
    """Names the function reads that it does not bind itself; None if it does something a self-contained
    pure function would not (yield, global state, imports, dunder attributes)."""
    stored = {fn.name} | {a.arg for a in fn.args.args}
    loaded = set()
    for node in ast.walk(fn):
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await, ast.Global, ast.Nonlocal, ast.Import,
                             ast.ImportFrom, ast.ClassDef, ast.AsyncFunctionDef)):
            return None
        if isinstance(node, ast.Attribute) and node.attr.startswith("__"):
            return None
        if isinstance(node, ast.Name):
            (stored if isinstance(node.ctx, (ast.Store, ast.Del)) else loaded).add(node.id)
        elif isinstance(node, ast.arg):
            stored.add(node.arg)
        elif isinstance(node, ast.FunctionDef) and node is not fn:
            stored.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            stored.add(node.name)
    if loaded & UNSAFE_BUILTINS:
        return None
    return loaded - stored - SAFE_BUILTINS


def _literal_call(source: str, name: str) -> tuple | None:
    """The arguments of a doctest line `name(literal, ...)`, or None."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
            and not node.keywords):
        return None
    try:
        return tuple(ast.literal_eval(a) for a in node.args)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def candidates(text: str, source: str) -> list[Candidate]:
    """The functions of one file that qualify (module docstring rules above)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    lines = text.splitlines(keepends=True)
    imports = _imports(tree)
    out = []
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or fn.decorator_list or fn.col_offset != 0:
            continue
        a = fn.args
        doc = ast.get_docstring(fn)
        if doc is None or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or len(fn.body) < 2:
            continue
        doc_end, first = fn.body[0].end_lineno, fn.body[1]
        n_body = fn.end_lineno - doc_end
        if not (MIN_BODY_LINES <= n_body <= MAX_BODY_LINES) or first.lineno <= doc_end:
            continue
        free = _free_names(fn)
        if free is None or any(n not in imports for n in free):
            continue
        required = tuple(x.arg for x in a.args[:len(a.args) - len(a.defaults)])
        if not 1 <= len(required) <= MAX_PARAMS:
            continue
        calls = []
        for ex in doctest.DocTestParser().get_examples(doc):
            args = _literal_call(ex.source, fn.name)
            if args is not None and len(args) == len(required):
                calls.append(args)
        body = "".join(lines[doc_end:fn.end_lineno])
        indent = lines[first.lineno - 1][:first.col_offset]
        out.append(Candidate(fn.name, source, "\n".join(sorted({imports[n] for n in free})),
                             "".join(lines[fn.lineno - 1:doc_end]), body, indent, required, tuple(calls)))
    return out


def _pool(param: str) -> tuple:
    name = param.lower()
    if name in INT_NAMES:
        return INTS
    if name in STR_NAMES:
        return STRS
    if name in LIST_NAMES:
        return LISTS
    return INTS[:6] + STRS[:4] + LISTS[:5] + FLOATS[:2] + OTHER


def inputs(c: Candidate) -> list[tuple]:
    """Doctest calls first, then name-guided small values; deterministic per function, no repeats."""
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{c.source}:{c.name}".encode()).digest()[:8], "big"))
    out, seen = [], set()
    for args in list(c.calls) + [tuple(rng.choice(_pool(p)) for p in c.params) for _ in range(FUZZ_TRIES)]:
        key = repr(args)
        if key not in seen:
            seen.add(key)
            out.append(args)
    return out


RECORDER = '''
import copy, json, math, signal, warnings
warnings.simplefilter("ignore")

def _plain(x, depth=0):
    if depth > 6:
        return False
    if x is None or isinstance(x, (bool, int, str)):
        return True
    if isinstance(x, float):
        return math.isfinite(x)
    if type(x) in (list, tuple, set):
        return all(_plain(v, depth + 1) for v in x)
    if type(x) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in x.items())
    return False

def _alarm(*_):
    raise TimeoutError

signal.signal(signal.SIGALRM, _alarm)
_out = {}
for _i, _args in enumerate(%(cases)r):
    if len(_out) >= %(max_cases)d:
        break
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        _r1 = %(name)s(*copy.deepcopy(_args))
        _r2 = %(name)s(*copy.deepcopy(_args))
        signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException:
        signal.setitimer(signal.ITIMER_REAL, 0)
        continue
    if _plain(_r1) and type(_r1) is type(_r2) and _r1 == _r2 and len(repr(_r1)) <= %(max_repr)d:
        _out[_i] = repr(_r1)
print(%(mark)r + json.dumps(_out))
'''


def recorder(c: Candidate, cases: list[tuple]) -> str:
    """A program (run in the sandbox) that prints the index -> repr(output) of the calls that qualify."""
    return (c.prompt + c.body + "\n" + RECORDER % {"cases": cases, "name": c.name, "max_cases": MAX_CASES + 2,
                                                   "max_repr": MAX_REPR, "mark": RESULT_MARK})


def parse_recording(output: str) -> dict[int, str]:
    line = next((ln for ln in reversed(output.splitlines()) if ln.startswith(RESULT_MARK)), None)
    if line is None:
        return {}
    try:
        return {int(k): v for k, v in json.loads(line[len(RESULT_MARK):]).items()}
    except (ValueError, AttributeError):
        return {}


TEST = '''import math


def _same(got, want):
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(want, (list, tuple)):
        return type(got) is type(want) and len(got) == len(want) and all(map(_same, got, want))
    return got == want


CASES = [
%s
]


def check(candidate):
    for args, want in CASES:
        assert _same(candidate(*args), want), (args, want)
'''


def test_code(cases: list[tuple[tuple, str]]) -> str:
    """check(candidate) over (arguments, repr of the expected output) pairs."""
    return TEST % "\n".join(f"    ({args!r}, {want}),".replace("\n", " ") for args, want in cases)


def make_task(c: Candidate, recorded: dict[int, str], cases: list[tuple], prefix: str) -> ExecTask | None:
    """The task for a recorded candidate, or None if its cases are too few or all give one output."""
    kept = [(cases[i], recorded[i]) for i in sorted(recorded)][:MAX_CASES]
    if len(kept) < MIN_CASES or len({w for _, w in kept}) < MIN_DISTINCT:
        return None
    return ExecTask(f"{prefix}/{c.source}:{c.name}", c.prompt, c.name, c.body, test_code(kept), len(kept), c.source)


def wrong_body(task: ExecTask) -> str:
    first = next((ln for ln in task.canonical_solution.splitlines() if ln.strip()), "    pass")
    return first[:len(first) - len(first.lstrip())] + "return None\n"


def _batches(files: Iterable[tuple[str, str]], size: int) -> Iterator[list[Candidate]]:
    """Candidates of the files in the order given, `size` at a time (files are read only as needed)."""
    batch: list[Candidate] = []
    for key, text in files:
        batch += candidates(text, key)
        while len(batch) >= size:
            yield batch[:size]
            batch = batch[size:]
    if batch:
        yield batch


def generate(files: Iterable[tuple[str, str]], prefix: str, limit: int, workers: int | None = None,
             timeout_s: float = 10.0) -> list[ExecTask]:
    """At most `limit` tasks from (file key, text) pairs, taken in the order given. Every task's tests
    pass on the original body and fail on `return None`, both checked by the sandbox's judge."""
    from codetune.eval.humaneval import task as sandbox_task
    from codetune.eval.sandbox import Limits, run_checks, run_programs

    limits = Limits(timeout_s=timeout_s)
    tasks: list[ExecTask] = []
    for chunk in _batches(files, max(8, 2 * limit)):  # (most candidates fail: record a few more than needed)
        case_lists = [inputs(c) for c in chunk]
        runs = run_programs([recorder(c, cs) for c, cs in zip(chunk, case_lists)], limits, workers)
        made = [make_task(c, parse_recording(r.output), cs, prefix) for c, cs, r in zip(chunk, case_lists, runs)]
        made = [t for t in made if t is not None]
        checks = run_checks([sandbox_task(t.problem(), t.canonical_solution) for t in made]
                            + [sandbox_task(t.problem(), wrong_body(t)) for t in made], limits, workers)
        good, bad = checks[:len(made)], checks[len(made):]
        tasks += [t for t, g, b in zip(made, good, bad) if g.passed and not b.passed]
        if len(tasks) >= limit:
            break
    return tasks[:limit]


def write_jsonl(path: Path, tasks: list[ExecTask]) -> None:
    from codetune.atomic import write_text

    write_text(path, "".join(json.dumps(t.problem()) + "\n" for t in tasks))


def read_jsonl(path: Path) -> list[ExecTask]:
    return [ExecTask(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def decontam_rows(tasks: list[ExecTask]) -> str:
    """JSONL for `codetune prepare --decontam-files`: a training file holding a task's prompt or whole
    function (whitespace-normalised) is dropped, so no held-out function is trained on through a copy."""
    return "".join(json.dumps({"prompt": t.prompt, "code": t.prompt + t.canonical_solution}) + "\n" for t in tasks)
