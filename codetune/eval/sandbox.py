"""Runs untrusted model-written programs: each in its own subprocess and temporary directory, with
resource limits, a wall-clock timeout, a clean environment and — where the OS allows — its own network
and PID namespaces. The harness itself never runs the code, so it survives every completion.

What this does and does not protect against is written out in docs/sandbox.md; `detect()` reports which
protections are active on this machine, and evaluation results record it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from codetune.eval.sandbox_child import EXEC_FAILED, PRIVATE_WORKDIR

CHILD = str(Path(__file__).with_name("sandbox_child.py"))
NOBODY = 65534
OUTPUT_TAIL = 2000  # bytes of the program's output kept for the report
POLL_S = 0.005


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, enforced by the harness
    memory_bytes: int = 2 * 2**30  # RLIMIT_AS: address space per process
    file_bytes: int = 16 * 2**20  # RLIMIT_FSIZE: largest file a process may write
    max_procs: int = 64  # RLIMIT_NPROC: processes of the sandbox user (binds only for a non-root uid)
    max_files: int = 64  # RLIMIT_NOFILE: open descriptors


@dataclass(frozen=True)
class Protections:
    """How children are launched on this machine (found once by probing, see `detect`)."""
    prefix: tuple[str, ...] = ()  # e.g. ("/usr/bin/unshare", "--mount", "--net", "--pid", "--fork", "--kill-child")
    python: str = sys.executable  # interpreter that runs the untrusted program
    uid: int | None = None  # when the harness is root: the unprivileged uid the program runs as
    network_namespace: bool = False
    pid_namespace: bool = False
    private_tmp: bool = False  # /tmp, /var/tmp, /dev/shm replaced by empty tmpfs (own mount namespace)
    notes: list[str] = field(default_factory=list, hash=False, compare=False)

    def summary(self) -> dict:
        d = asdict(self)
        d["prefix"] = list(self.prefix)
        d["nproc_limit_binds"] = self.uid is not None or os.geteuid() != 0
        return d


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout | sandbox_error
    returncode: int | None
    duration_s: float
    reason: str  # short cause of a failure: last line of output or the signal
    output: str  # tail of stdout + stderr

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _spec(workdir: Path, limits: Limits, prot: Protections) -> str:
    # With a private /tmp the work folder reappears at /tmp/work (see sandbox_child.private_tmp).
    home = PRIVATE_WORKDIR if prot.private_tmp else str(workdir)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    return json.dumps({
        "cpu_s": max(1, int(limits.timeout_s + 0.999)), "memory_bytes": limits.memory_bytes,
        "file_bytes": limits.file_bytes, "max_procs": limits.max_procs, "max_files": limits.max_files,
        "workdir": str(workdir), "program": "program.py", "python": prot.python, "env": env,
        "uid": prot.uid, "gid": prot.uid, "private_tmp": prot.private_tmp,
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


def _describe(rc: int | None, output: str, timed_out: bool) -> tuple[str, str]:
    if timed_out:
        return "timeout", "wall-clock timeout"
    if rc == 0:
        return "passed", ""
    if rc == EXEC_FAILED:
        return "sandbox_error", output.strip().splitlines()[-1] if output.strip() else "could not start"
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else None
    if sig == signal.SIGXCPU:  # the CPU-time limit equals the wall timeout: whichever fires first, it's a timeout
        return "timeout", "CPU-time limit"
    if sig:
        try:
            return "failed", f"killed by {signal.Signals(sig).name}"
        except ValueError:
            pass
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    return "failed", lines[-1][:300] if lines else f"exit code {rc}"


def run_program(source: str, limits: Limits = Limits(), prot: Protections | None = None) -> ExecResult:
    """Run one Python program in a fresh sandbox; passed means it exited with status 0 in time."""
    prot = prot or detect()
    # base/ (root's, traverse-only for others) holds the output file; base/work/ is the program's own
    # folder. "../x" from the program therefore lands in a folder it may not write to.
    base = Path(tempfile.mkdtemp(prefix="codetune-sandbox-"))
    try:
        os.chmod(base, 0o711)
        workdir = base / "work"
        workdir.mkdir(mode=0o700)
        (workdir / "program.py").write_text(source)
        if prot.uid is not None:
            os.chown(workdir, prot.uid, prot.uid)  # the only place the program may write
        start = time.monotonic()
        with open(base / "output", "wb") as out:
            cmd = [*prot.prefix, sys.executable, "-I", "-B", CHILD, _spec(workdir, limits, prot)]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=workdir, env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
                                    close_fds=True)
        exited = _wait_unreaped(proc.pid, start + limits.timeout_s)
        # Kill the whole group whether or not the program finished: nothing it started outlives it.
        _kill_group(proc.pid)
        rc = proc.wait()
        duration = time.monotonic() - start
        with open(base / "output", "rb") as f:
            f.seek(max(0, (base / "output").stat().st_size - OUTPUT_TAIL))
            output = f.read().decode("utf-8", "replace")
        status, reason = _describe(rc, output, timed_out=not exited)
        return ExecResult(status, rc, round(duration, 3), reason, output)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[ExecResult]:
    """Run many programs in parallel (threads only wait on subprocesses). A sandbox that could not start
    (e.g. a concurrent fork bomb briefly exhausted the sandbox user's process quota) is retried once."""
    prot = detect()

    def one(src: str) -> ExecResult:
        res = run_program(src, limits, prot)
        if res.status == "sandbox_error":
            time.sleep(0.5)
            res = run_program(src, limits, prot)
        return res

    workers = workers or max(2, min(8, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))


def _works(prot: Protections) -> bool:
    res = run_program("print('sandbox-ok')", Limits(timeout_s=20.0), prot)
    return res.passed and "sandbox-ok" in res.output


@cache
def detect() -> Protections:
    """Probe once which protections work here, strongest first, and fall back gracefully."""
    root = os.geteuid() == 0
    namespaced = ("--net", "--pid", "--fork", "--kill-child")
    # (prefix, private /tmp). As root the namespaces need no user namespace; otherwise one grants them.
    userns = () if root else ("--user", "--map-root-user")
    layouts: list[tuple[tuple[str, ...], bool]] = []
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare:
        layouts += [((unshare, *userns, "--mount", *namespaced), True), ((unshare, *userns, *namespaced), False)]
    layouts.append(((), False))
    pythons = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin"))
                                 if p))
    # Root ignores RLIMIT_NPROC and may write anywhere, so as root try to run the program as `nobody`;
    # that needs an interpreter `nobody` can read (a pyenv under /root is not), hence several candidates.
    uids = [NOBODY, None] if root else [None]
    for prefix, private in layouts:
        for uid in uids:
            for python in pythons if uid is not None else [sys.executable]:
                prot = Protections(prefix, python, uid, bool(prefix), bool(prefix), private)
                if not _works(prot):
                    continue
                notes = []
                if not prefix:
                    notes.append("unshare unavailable: no network, PID or mount namespace")
                elif not private:
                    notes.append("no private /tmp: the program can write to the shared temporary folders")
                if root and uid is None:
                    notes.append("running as root without an interpreter an unprivileged user can run: "
                                 "RLIMIT_NPROC does not bind and the program may write where root can")
                return Protections(prefix, python, uid, bool(prefix), bool(prefix), private, notes)
    raise RuntimeError("the execution sandbox cannot start even a trivial Python program here; "
                       "check that the temporary directory is writable")
