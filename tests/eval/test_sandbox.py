"""Hostile completions are contained, scored as failures, and the harness (this test process) survives.

Each test is bounded: short wall-clock timeouts, a small process quota for the fork bomb, and tests
whose containment depends on an OS feature skip where that feature is not active (so they can never
harm the machine they run on)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from codetune.eval import humaneval
from codetune.eval.sandbox import Limits, detect, run_program, run_programs

FAST = Limits(timeout_s=3.0, max_procs=32)


def problem_with(body: str) -> dict:
    """A HumanEval-shaped problem whose completion is `body`: passing would mean the hostile act worked."""
    return {"task_id": "Hostile/0", "entry_point": "f", "prompt": "def f():\n",
            "test": "def check(candidate):\n    assert candidate() == 1\n", "canonical_solution": "    return 1\n",
            "_body": body}


def score_one(body: str, limits: Limits = FAST):
    prob = problem_with(body)
    records, summary = humaneval.score([prob], [[body]], limits)
    return records[0]["samples"][0], summary


def test_protections_are_reported():
    s = detect().summary()
    for key in ("network_namespace", "pid_namespace", "private_tmp", "uid", "nproc_limit_binds", "python"):
        assert key in s


def test_plain_program_passes_and_failure_is_explained():
    assert run_program("print('hi')", FAST).passed
    res = run_program("raise ValueError('nope')", FAST)
    assert res.status == "failed" and "ValueError: nope" in res.reason


def test_clean_environment_and_private_workdir():
    os.environ["CODETUNE_SECRET_FOR_TEST"] = "leak"
    try:
        res = run_program("import os, sys\nassert 'CODETUNE_SECRET_FOR_TEST' not in os.environ, 'env leaked'\n"
                          "open('scratch.txt', 'w').write('ok')\nprint(os.getcwd())", FAST)
    finally:
        del os.environ["CODETUNE_SECRET_FOR_TEST"]
    assert res.passed, res.output


def test_infinite_loop_times_out():
    t = time.monotonic()
    sample, summary = score_one("    while True:\n        pass\n")
    assert sample["status"] == "timeout" and summary["pass@1"] == 0.0
    assert time.monotonic() - t < FAST.timeout_s + 5


def test_fork_bomb_is_contained():
    prot = detect()
    if not (prot.summary()["nproc_limit_binds"] or prot.pid_namespace):
        pytest.skip("neither RLIMIT_NPROC nor a PID namespace binds here: a fork bomb test could harm the machine")
    body = "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n"
    t = time.monotonic()
    sample, summary = score_one(body)
    assert sample["status"] in ("timeout", "failed") and summary["pass@1"] == 0.0
    assert time.monotonic() - t < FAST.timeout_s + 5


def test_allocating_100_gb_hits_the_memory_limit():
    sample, _ = score_one("    x = bytearray(100 * 2**30)\n    return 1\n")
    assert sample["status"] == "failed" and "MemoryError" in sample["reason"]


def test_writing_outside_the_workdir_is_contained(tmp_path):
    prot = detect()
    if prot.uid is None and os.geteuid() != 0:
        pytest.skip("the sandbox runs as the invoking user here, who may write to its own folders (docs/sandbox.md)")
    target = tmp_path / "escaped.txt"
    tmp_target = f"/tmp/codetune-escape-{os.getpid()}.txt"
    body = (f"    open({str(target)!r}, 'w').write('x')\n    open('../escaped.txt', 'w').write('x')\n"
            f"    open({tmp_target!r}, 'w').write('x')\n    return 1\n")
    sample, _ = score_one(body)
    assert sample["status"] == "failed"
    assert not target.exists()
    if prot.private_tmp:  # otherwise /tmp is shared and world-writable by design of the OS
        run_program(f"open({tmp_target!r}, 'w').write('x')", FAST)
        assert not os.path.exists(tmp_target)


def test_opening_a_socket_is_contained():
    if not detect().network_namespace:
        pytest.skip("no network namespace on this machine: the sandbox cannot block the network (docs/sandbox.md)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    got, done = [], threading.Event()

    def accept():
        while not done.is_set() and not got:
            try:
                got.append(server.accept())
            except (TimeoutError, OSError):
                continue

    th = threading.Thread(target=accept)
    th.start()
    body = (f"    import socket\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'hello')\n    return 1\n")
    sample, _ = score_one(body)
    done.set()
    th.join()
    server.close()
    assert sample["status"] == "failed" and not got


def test_signalling_the_parent_is_contained():
    prot = detect()
    if prot.uid is None and not prot.pid_namespace:
        pytest.skip("without a PID namespace or a separate uid the program could signal this test process")
    me = os.getpid()
    body = (f"    import os, signal\n    for pid in ({me}, os.getppid(), 0, -1):\n        try:\n"
            "            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n"
            f"    os.kill({me}, signal.SIGTERM)\n    return 1\n")
    sample, _ = score_one(body)
    assert sample["status"] == "failed"  # os.kill raised: the harness is out of reach
    assert os.getpid() == me  # and we are still here


def test_output_flood_is_bounded():
    res = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", FAST)
    assert not res.passed and len(res.output) <= 4000


def test_parallel_runs_keep_order():
    res = run_programs([f"import sys; sys.exit({i % 2})" for i in range(8)], FAST, workers=4)
    assert [r.passed for r in res] == [i % 2 == 0 for i in range(8)]


def test_an_interrupted_check_leaves_no_program_running(monkeypatch):
    # (Ctrl-C while the judge ran used to leave the sandboxed program running on its own)
    import subprocess

    from codetune.eval import sandbox

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupted(task, sock, limits, deadline):
        sock.close()
        raise KeyboardInterrupt

    prot = detect()
    monkeypatch.setattr(sandbox.subprocess, "Popen", popen)
    monkeypatch.setattr(sandbox, "_judge", interrupted)
    task = sandbox.Task(program="import time\ntime.sleep(60)\ndef f():\n    pass\n", entry_point="f",
                        test="def check(candidate):\n    pass\n")
    with pytest.raises(KeyboardInterrupt):
        sandbox.run_check(task, FAST, prot)
    assert started and started[0].poll() is not None
