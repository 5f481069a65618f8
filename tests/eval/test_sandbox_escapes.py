"""Attacks on the score itself and on other samples (issues 14 and 15): a pass needs proof that check()
returned; /proc, the process quota and the disk are the sandbox's own. Each test skips, saying why,
where the protection it checks is not active on this machine."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace

import pytest

from codetune.eval import humaneval
from codetune.eval.sandbox import Limits, Task, detect, run_check, run_checks, run_program
from codetune.eval.sandbox_runner import Opaque, decode, encode
from codetune.eval.sandbox_uids import UID_BASE

FAST = Limits(timeout_s=4.0, max_procs=32)
SQUARE = {"task_id": "Square/0", "entry_point": "f", "prompt": "def f(x):\n", "canonical_solution": "    return x * x\n",
          "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"}
HIJACK = ("import json, socket, struct\nfor fd in range(3, 64):\n    try:\n        s = socket.socket(fileno=fd)\n"
          "        m = json.dumps({'value': {'i': hex(4)}}).encode()\n        s.sendall(struct.pack('>I', len(m)) + m)\n"
          "    except OSError:\n        pass\n")
# Every way we know to end the interpreter with status 0, or to fake success, before check() returns.
EARLY_EXITS = {
    "os._exit at top level": "    return 0\nimport os\nos._exit(0)\n",
    "os._exit in the body": "    import os\n    os._exit(0)\n",
    "SystemExit in the body": "    raise SystemExit(0)\n",
    "sys.exit at top level": "    return 0\nimport sys\nsys.exit(0)\n",
    "KeyboardInterrupt": "    raise KeyboardInterrupt\n",
    "own BaseException": "    class Out(BaseException):\n        pass\n    raise Out()\n",
    "atexit hook": "    import atexit, os\n    atexit.register(os._exit, 0)\n    raise SystemExit(1)\n",
    "signal to itself": "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n    return 0\n",
    "signal handler exits": ("    import os, signal\n    signal.signal(signal.SIGUSR1, lambda *a: os._exit(0))\n"
                             "    os.kill(os.getpid(), signal.SIGUSR1)\n    return 0\n"),
    "thread exits": "    import os, threading, time\n    threading.Thread(target=os._exit, args=(0,)).start()\n    time.sleep(1)\n",
    "close every fd": "    import os\n    os.closerange(0, 1024)\n    return 4\n",
    "exec another program": "    import os\n    os.execv('/bin/true', ['true'])\n",
    "print a success marker": "    print('passed'); print('OK'); return 0\n",
    "equal to everything": "    class E:\n        __eq__ = lambda s, o: True\n    return E()\n",
    "patch builtins": "    return 0\nimport builtins\nbuiltins.AssertionError = type('A', (BaseException,), {})\n",
    "forge the judge's reply": "    return 0\n" + HIJACK,
}


def test_no_early_exit_or_forgery_scores_a_pass():
    records, summary = humaneval.score([SQUARE] * (len(EARLY_EXITS) + 1),
                                       [["    return x * x\n"]] + [[c] for c in EARLY_EXITS.values()], FAST)
    assert records[0]["passed"] == 1, records[0]["samples"][0]  # the honest control passes
    passed = [name for name, r in zip(EARLY_EXITS, records[1:]) if r["passed"]]
    assert not passed, f"scored as passed: {passed}"
    assert summary["statuses"].get("sandbox_error", 0) == 0, records


def test_exit_status_0_was_a_pass_under_the_old_scoring():
    # The same programs as one file ending in check(f), judged by exit status: this is what used to be
    # scored, and why a pass now needs the judge.
    for body in (EARLY_EXITS["os._exit in the body"], EARLY_EXITS["SystemExit in the body"]):
        single = SQUARE["prompt"] + body + "\n" + SQUARE["test"] + "\ncheck(f)\n"
        assert run_program(single, FAST).passed


def test_the_judge_reports_why_and_where():
    res = run_check(humaneval.task(SQUARE, "    return x + 2\n"), FAST)
    assert res.status == "failed" and res.reason == "AssertionError (test line 3)"
    res = run_check(humaneval.task(SQUARE, "    import os\n    os._exit(0)\n"), FAST)
    assert res.status == "failed" and "ended during a call to f (exit status 0)" in res.reason
    res = run_check(humaneval.task(SQUARE, "    raise ValueError('no')\n"), FAST)
    assert res.status == "failed" and "ValueError: no" in res.reason


def test_exceptions_cross_as_their_builtin_type():
    test = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError:\n        pass\n"
            "    else:\n        raise AssertionError('no ValueError')\n    assert candidate(2) == 4\n")
    task = Task(program="def f(x):\n    if x < 0:\n        raise ValueError(x)\n    return x * x\n",
                entry_point="f", test=test)
    assert run_check(task, FAST).passed


def test_wire_keeps_types_and_builds_only_plain_values():
    values = [None, True, 0, -2**200, 1.5, float("inf"), -0.0, "é\ud800", b"\x00", (1, [2]), {1: (2,)},
              {3, 4}, frozenset({5}), 2 + 3j, [[], ()]]
    back = decode(encode(values))
    assert back == values and [type(v) for v in back] == [type(v) for v in values]
    assert isinstance(decode(encode(iter([]))), Opaque) and decode(encode(iter([]))) != decode(encode(iter([])))
    for bad in ({"x": 1}, {"i": 5}, 3, {"i": "1", "f": "2"}):
        with pytest.raises(ValueError):
            decode(bad)


def test_private_proc_shows_only_the_sandbox():
    if not detect().private_proc:
        pytest.skip("no private /proc here: the program can list every process (docs/sandbox.md)")
    body = "import json, os\nprint(json.dumps(sorted(int(p) for p in os.listdir('/proc') if p.isdigit())))\n"
    res = run_program(body, FAST)
    assert res.passed, res.output
    pids = json.loads(res.output.strip().splitlines()[-1])
    assert pids == [1]  # the program itself, PID 1 of its namespace: nothing of the host


def test_disk_writes_are_bounded_and_nothing_escapes(tmp_path):
    prot = detect()
    if not (prot.private_tmp and prot.read_only_fs):
        pytest.skip("no private, size-bounded /tmp or read-only mounts here (docs/sandbox.md)")
    outside = tmp_path / "escaped"
    body = ("import os\nn = 0\ntry:\n    for i in range(1024):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * 2**20)\n        n += 1\nexcept OSError as e:\n    print('full', n, e.errno)\n"
            f"for p in ['/var/tmp/a', '/dev/shm/a', {str(outside)!r}, '/x', '../../x']:\n    try:\n"
            "        open(p, 'wb').write(b'x' * 2**21)\n        print('wrote', p)\n    except OSError:\n        pass\n")
    t = time.monotonic()
    res = run_program(body, replace(FAST, disk_bytes=8 * 2**20))
    assert res.passed and "wrote" not in res.output, res.output
    full = res.output.split("full ")[1].split()
    assert int(full[0]) < 8 and full[1] == "28"  # ENOSPC within the 8 MiB bound
    assert not outside.exists() and time.monotonic() - t < FAST.timeout_s + 3


BOMB = ("import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.05)\n")


def _bomb_in_background(timeout_s: float, prot=None) -> threading.Thread:
    # A quota a little above the samples' own: one uid then holds more processes than a sample may
    # start with (the kernel refuses execve with EAGAIN) — what two concurrent samples beside a bomb
    # with equal quotas reach, made certain.
    limits = replace(FAST, timeout_s=timeout_s, max_procs=FAST.max_procs + 8)
    th = threading.Thread(target=lambda: run_program(BOMB, limits, prot))
    th.start()
    time.sleep(1.0)  # long enough for the bomb to fill its process quota
    return th


def test_a_fork_bomb_does_not_fail_concurrent_samples():
    prot = detect()
    if not (prot.uid_per_sample and prot.pid_namespace):
        pytest.skip("samples share one uid here (not root): a fork bomb spends their common quota")
    bomb = _bomb_in_background(3.5)
    t = time.monotonic()
    res = run_checks([humaneval.task(SQUARE, "    return x * x\n")] * 4, FAST, workers=4)
    elapsed = time.monotonic() - t
    bomb.join()
    assert all(r.passed for r in res), [r.reason for r in res]
    assert elapsed < 2.0, f"correct samples waited {elapsed:.1f}s for the bomb: they share its quota"


def test_a_start_without_processes_waits_instead_of_failing():
    """Issue 15: on a busy machine a start can fail with EAGAIN; that is retried, never scored."""
    prot = detect()
    if prot.uid is None or not prot.pid_namespace:
        pytest.skip("needs a uid switch and a PID namespace to exhaust one uid's quota safely")
    shared = replace(prot, uid=UID_BASE - 1, uid_per_sample=False)  # one uid for the bomb and the sample
    bomb = _bomb_in_background(2.5, shared)
    res = run_check(humaneval.task(SQUARE, "    return x * x\n"), FAST, shared)
    bomb.join()
    assert res.passed, res.reason


def test_the_program_holds_no_capability_and_can_gain_none():
    body = ("import json\nprint(json.dumps(dict(ln.split()[:2] for ln in open('/proc/self/status')"
            " if ln.startswith(('Cap', 'NoNewPrivs')))))\n")
    res = run_program(body, FAST)
    assert res.passed, res.output
    fields = json.loads(res.output.strip().splitlines()[-1])
    assert fields["CapEff:"] == fields["CapPrm:"] == fields["CapBnd:"] == "0" * 16 and fields["NoNewPrivs:"] == "1"


def test_a_reply_the_judge_cannot_parse_fails_the_sample():
    deep = ("    import json, socket, struct\n    s = socket.socket(fileno=int(__import__('sys').argv[3]))\n"
            "    m = ('[' * 100000 + ']' * 100000).encode()\n    s.sendall(struct.pack('>I', len(m)) + m)\n"
            "    import time; time.sleep(5)\n")
    res = run_check(humaneval.task(SQUARE, deep), FAST)
    assert res.status == "failed" and "broke off a call" in res.reason, res.reason
