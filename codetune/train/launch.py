"""`codetune train --num-gpus N`: the same command re-run as N processes through Accelerate's own
launcher (`python -m accelerate.commands.launch --multi_gpu --num_processes N -m codetune train ...`),
with its exit code, signals and errors passed through as if it had run here.

* Inside a launched process (torchrun's or Accelerate's variables are set) nothing is re-launched: the
  run is one of the N. The flags go through unchanged, --num-gpus included, so config.yaml and the
  printed resume command say how many processes the run had.
* `--multi_gpu` on a machine without CUDA also starts N processes (Accelerate hands them to torchrun),
  which Accelerator(cpu=True) joins into a gloo group: the CPU tests run this very launcher.
  (`accelerate launch --cpu --num_processes N` starts ONE process: not usable here.)
* The launcher runs in its own session, so a Ctrl-C in the terminal reaches this process alone, which
  forwards it once; the launcher passes it to every worker once, and each stops at the same step with a
  checkpoint (a second SIGINT straight from the terminal would abort them without one).
* A worker's exit code is the command's: each worker records it beside CODETUNE_EXIT_FILE (the launcher
  itself only knows "a child failed": exit 1), and the launcher's own report of a failed child (a
  traceback of its internals) is dropped when a worker has said what went wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from codetune.config import ConfigError

EXIT_FILE = "CODETUNE_EXIT_FILE"
# set in every process torchrun or `accelerate launch` starts
LAUNCHED_VARS = ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_LAUNCHED", "ACCELERATE_PROCESS_INDEX")


def launched(env=None) -> bool:
    """Is this process one of a launched group (torchrun, accelerate launch)?"""
    env = os.environ if env is None else env
    return any(k in env for k in LAUNCHED_VARS)


def world_size(env=None) -> int:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1"))


def check_processes(tcfg, cuda: bool, processes: int, gpus: int | None = None) -> None:
    """The process count and --distributed against the machine: one rule for the launching command
    (processes = --num-gpus, gpus = the visible count) and for each launched process (processes = the
    group's size)."""
    if cuda and gpus is not None and processes > gpus:
        raise ConfigError(f"--num-gpus {processes}: this machine has {gpus} visible CUDA GPU"
                          f"{'s' if gpus != 1 else ''}; pass --num-gpus {gpus} or less (CUDA_VISIBLE_DEVICES "
                          "decides which are visible)")
    if tcfg.distributed == "fsdp":
        if not cuda:
            raise ConfigError("--distributed fsdp runs on CUDA GPUs only (Accelerate shards over NCCL); on the CPU "
                              "use --distributed ddp")
        if processes < 2:
            raise ConfigError("--distributed fsdp shards the model over several processes; pass --num-gpus 2 or "
                              "more, or drop --distributed fsdp")
    if tcfg.num_gpus is not None and launched() and tcfg.num_gpus != processes:
        raise ConfigError(f"--num-gpus {tcfg.num_gpus}, but the launcher started {processes} processes; pass "
                          f"--num-gpus {processes} or leave it out")


@dataclasses.dataclass(frozen=True)
class Launch:
    argv: list[str]  # the launcher's command line
    env: dict


def free_port() -> int:
    with socket.socket() as s:  # (two runs on one host must not share the default 29500)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(n: int, train_args: list[str], exit_file: Path, port: int) -> Launch:
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no", "-m", "codetune", "train", *train_args]
    # OMP_NUM_THREADS: torchrun would set 1 with a warning when unset; say it, so the warning goes
    env = {**os.environ, EXIT_FILE: str(exit_file), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return Launch(argv, env)


def _launcher_line(line: str) -> bool:
    """A log line of torch's elastic agent (under `accelerate launch`): "W1201 12:07:35.559000 25427
    torch/distributed/elastic/...] Received 2 death signal, shutting down workers"."""
    return "torch/distributed/elastic/" in line and line[:1] in "IWEF"


def _forward_stderr(pipe, held: list[str], debug: bool) -> None:
    """The workers' stderr as it comes; the launcher's own account of a failed or signalled child (its log
    lines, and the traceback of its internals it ends with: workers print none without --debug) held
    back, for relaunch() to show only where no worker said what went wrong."""
    tail = False
    for line in iter(pipe.readline, ""):
        tail = tail or (not debug and line.startswith("Traceback (most recent call last)"))
        if tail or (not debug and _launcher_line(line)):
            held.append(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()


@dataclasses.dataclass(frozen=True)
class WorkerExit:
    rank: int
    code: int
    message: str | None  # the one line a known error printed (or, off the main worker, would have)


def recorded_exits(exit_file: Path) -> list[WorkerExit]:
    """What the workers recorded, main worker first."""
    out = []
    for p in exit_file.parent.glob(exit_file.name + ".*"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            d = json.loads(p.read_text())
            out.append(WorkerExit(int(d["rank"]), int(d["code"]), d.get("message")))
    return sorted(out, key=lambda w: w.rank)


def launch(cfgs: dict, ns) -> int:
    """--num-gpus N from a plain command: N processes through `accelerate launch`, after the checks that
    need no model (a wrong folder or GPU count is one line here, not N)."""
    import torch

    from codetune.train.rundir import check_out_dir, given_args

    tcfg = cfgs["train"]
    cuda = torch.cuda.is_available()
    check_processes(tcfg, cuda, tcfg.num_gpus, torch.cuda.device_count() if cuda else None)
    check_out_dir(tcfg.out_dir, tcfg.resume)
    if ns is None:
        raise ConfigError("--num-gpus needs the command line (codetune train ...); called as a library, start the "
                          "processes with `accelerate launch -m codetune train`")
    debug = bool(getattr(ns, "debug", False))
    return relaunch(tcfg.num_gpus, given_args(ns) + (["--debug"] if debug else []), debug)


def relaunch(n: int, train_args: list[str], debug: bool = False) -> int:
    """Run `codetune train train_args` as n processes; returns the exit code the run ended with."""
    with tempfile.TemporaryDirectory(prefix="codetune-launch-") as tmp:
        exit_file = Path(tmp) / "exit"
        cmd = launch_command(n, train_args, exit_file, free_port())
        proc = subprocess.Popen(cmd.argv, env=cmd.env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        held: list[str] = []
        reader = threading.Thread(target=_forward_stderr, args=(proc.stderr, held, debug), daemon=True)
        reader.start()

        def forward(signum, _frame):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            rc = proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        reader.join()
        exits = recorded_exits(exit_file)
        main = next((w for w in exits if w.rank == 0), None)
        if main is not None and not (main.code == 0 and rc != 0):
            return main.code  # (it printed its own words)
        failed = next((w for w in exits if w.code != 0), None)
        if failed is not None:  # a worker failed alone: its line (it kept quiet), not the launcher's report
            if failed.message:
                print(f"codetune train: {failed.message}", file=sys.stderr)
            return failed.code
        sys.stderr.writelines(held)  # the launcher failed on its own: its words are all there is
        return rc


@contextlib.contextmanager
def exit_recorder():
    """In a worker started by relaunch(): record the code it ends with (an exception's, as codetune.cli
    reports it) for the launching command to return. A known error is said by the main worker alone: the
    checks that raise them run alike on every process, and N copies of one line written at once through
    the launcher's pipe come out interleaved. (A worker that fails alone has its line printed by
    relaunch() from the record.)"""
    path, rank = os.environ.get(EXIT_FILE), int(os.environ.get("RANK", "0"))
    record: dict = {}
    try:
        yield lambda code: record.update(code=code)
    except BaseException as e:
        from codetune.cli import explain

        known = explain(e) if isinstance(e, Exception) else None
        record.update(code=130 if isinstance(e, KeyboardInterrupt) else known[1] if known else 1,
                      message=known[0] if known else None)
        if path and rank != 0 and known:
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (the process ends with this exception)
        raise
    finally:
        if path and record:
            with contextlib.suppress(OSError):
                Path(f"{path}.{rank}").write_text(json.dumps({"rank": rank, **record}))
