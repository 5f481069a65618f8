"""Running codetune's CLI as users do (`python -m codetune ...` in the repository root), each call logged
to its own file, all under one time limit: a training run still going at the limit gets SIGTERM, which
codetune train answers with a checkpoint, so the same command continues it later (--resume)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MIN_START_S = 20.0     # a step is not started with less time left than this
TRAIN_GRACE_S = 240.0  # after SIGTERM, what a training run gets to write its checkpoint
OTHER_GRACE_S = 15.0


class TimeUp(Exception):
    """The time limit came: what finished is kept, and running the same command again continues."""


class StepFailed(Exception):
    def __init__(self, name: str, returncode: int, log: Path):
        self.name, self.returncode, self.log = name, returncode, log
        tail = [ln for ln in _tail(log).splitlines() if ln.strip()]
        super().__init__(f"{name} failed (exit {returncode}): {tail[-1] if tail else 'no output'} (log: {log})")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass
class Runner:
    root: Path                  # repository root: `python -m codetune` imports this checkout's package
    logs: Path
    env: dict
    deadline: float | None = None  # time.monotonic() at which to stop
    in_process: bool = False       # codetune.cli.main in this process: the same CLI, without the start-up
    command: tuple[str, ...] = (sys.executable, "-m", "codetune")
    min_start_s: float = MIN_START_S

    def left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check_time(self, name: str) -> None:
        left = self.left()
        if left is not None and left < self.min_start_s:
            raise TimeUp(f"time limit reached before {name}")

    def codetune(self, name: str, args: list[str], training: bool = False) -> float:
        """Run `codetune ARGS`; returns its wall seconds. Raises StepFailed on a non-zero exit, TimeUp at
        the limit (after the process has stopped: a training run checkpoints first)."""
        self.check_time(name)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        t0 = time.monotonic()
        with open(log, "a") as f:
            f.write(f"$ codetune {' '.join(args)}\n")
            f.flush()
            if self.in_process:
                rc = _in_process(args, f)
                self.record(name, time.monotonic() - t0, rc)
                if rc != 0:
                    raise StepFailed(name, rc, log)
                return time.monotonic() - t0
            proc = subprocess.Popen([*self.command, *args], cwd=self.root, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=self.left())
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=TRAIN_GRACE_S if training else OTHER_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                self.record(name, time.monotonic() - t0, None)
                raise TimeUp(f"time limit reached during {name}") from None
            except BaseException:  # (Ctrl-C of this script: the child goes too, by its pid)
                proc.kill()
                proc.wait()
                raise
        seconds = time.monotonic() - t0
        self.record(name, seconds, rc)
        if rc != 0:
            raise StepFailed(name, rc, log)
        return seconds

    @contextlib.contextmanager
    def in_time(self, name: str):
        """Python work of this process (execution scoring) under the limit: TimeUp when it comes, raised
        from SIGALRM wherever the work is. Its outputs are written beside their final paths and renamed,
        so a stop leaves only what remove_leftovers clears. Without a limit, or off the main thread (where
        no signal can be handled), it only checks that time is left."""
        import threading

        self.check_time(name)
        left = self.left()
        if left is None or threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(*_):
            raise TimeUp(f"time limit reached during {name}")

        old = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def record(self, name: str, seconds: float, returncode: int | None) -> None:
        """One line per step in logs/timings.jsonl: what the next run's time limits are planned from."""
        with open(self.logs / "timings.jsonl", "a") as f:
            f.write(json.dumps({"step": name, "seconds": round(seconds, 1), "returncode": returncode,
                                "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def _in_process(args: list[str], log) -> int:
    """`codetune ARGS` through the CLI's own entry point, its output to `log`; the exit code it returns."""
    from codetune.cli import main

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return int(main(list(args)) or 0)
        except SystemExit as e:  # (train's out-of-memory message leaves this way)
            print(e, file=log)
            return e.code if isinstance(e.code, int) else 1


def child_env(cache: Path) -> dict:
    """The environment of every codetune call: offline, this run's own cache (random-init checkpoints)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               CODETUNE_CACHE=str(cache))
    return env
