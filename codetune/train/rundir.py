"""The run directory: which folders `codetune train` may write into, what it leaves there besides
checkpoints and metrics (a marker, config.yaml), and the command that continues a stopped run.

A run writes only into an empty (or new) folder, or — with --resume — one it made itself: the marker
file says so (older runs without it are recognised by their checkpoints). Everything else is refused
before the model is loaded, so an earlier run's adapter, metrics and summary, or a user's files, are
never overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from codetune.atomic import write_text
from codetune.config import ConfigError, flag_name
from codetune.train.state import scan_checkpoints

MARKER = ".codetune-run"
CONFIG = "config.yaml"


def is_our_run(out: Path) -> bool:
    return (out / MARKER).is_file() or bool(scan_checkpoints(out))


def check_out_dir(out_dir: str | Path, resume: bool) -> None:
    """Refuse an --out-dir this run must not write into; reads only."""
    out = Path(out_dir)
    flag = f"--out-dir {out}"
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == out else f"is inside {p}, which is a file"
                raise ConfigError(f"{flag} {where}, not a folder; give the path of a new or empty folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag}: cannot write to {p} (permission denied); choose a writable --out-dir")
            break
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_our_run(out):
        raise ConfigError(f"{flag} is not empty and was not made by `codetune train`; choose a new or empty "
                          "--out-dir (nothing was touched)")
    good = [c for c in scan_checkpoints(out) if not c.missing]
    if not resume:
        what = f"a run (checkpoint at step {good[-1].step})" if good else "an earlier run's files"
        raise ConfigError(f"{flag} already holds {what}; pass --resume to continue it, or choose a new --out-dir "
                          "(nothing was overwritten)")
    if not good and (out / "adapter").exists():
        raise ConfigError(f"{flag} holds a trained adapter but no complete checkpoint to resume from; choose a new "
                          "--out-dir (nothing was overwritten)")


@contextlib.contextmanager
def claim(out: Path) -> Iterator[None]:
    """Mark the folder as a codetune run before anything else is written into it, and hold it for this
    process while the block runs: a second `codetune train` on the same --out-dir (a --resume started
    while the first still runs) would delete the first's saves in progress as leftovers and write over
    its metrics. The lock is on the marker itself (created in place, never replaced, so both runs lock
    the same file) and goes with the process, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--out-dir {out} is in use by another `codetune train` that is still running; "
                              "wait for it to finish (or stop it), or choose another --out-dir") from None
        if os.fstat(fd).st_size == 0:
            os.write(fd, b"made by `codetune train`; `--resume` may continue the run in this folder\n")
        yield
    finally:
        os.close(fd)  # (releases the lock)


def config_text(cfgs: dict) -> str:
    """The run's resolved configuration, as `--config` reads it back (config.dump_yaml: the one writer)."""
    from codetune.config import dump_yaml

    return dump_yaml(cfgs)


def write_config(out: Path, cfgs: dict) -> Path:
    write_text(out / CONFIG, config_text(cfgs))
    return out / CONFIG


def _flag_words(dest: str, value) -> list[str]:
    name = flag_name(dest.partition(".")[2])
    if isinstance(value, bool):
        return [name if value else "--no-" + name[2:]]
    if isinstance(value, list):
        return [name, *map(str, value)]
    return [name, str(value)]


def resume_command(ns, out: Path) -> str:
    """The command line that continues this run: the flags the user gave (from argparse's namespace, where
    only given flags are set) plus --resume. Without a namespace (called as a library), the run's own
    config.yaml holds every setting."""
    prog = "codetune" if Path(sys.argv[0]).name == "codetune" else "python -m codetune"
    if ns is None:
        return f"{prog} train --config {shlex.quote(str(out / CONFIG))} --resume"
    return f"{prog} train {shlex.join(given_args(ns, skip=('train.resume', 'train.dry_run')) + ['--resume'])}"


def given_args(ns, skip=()) -> list[str]:
    """The settings flags the user gave (argparse's namespace holds only given ones), as words again:
    for the resume command and for the processes `--num-gpus` launches."""
    words = ["--config", ns.config] if getattr(ns, "config", None) else []
    for dest, value in vars(ns).items():
        if "." in dest and dest not in skip:
            words += _flag_words(dest, value)
    return words
