"""The folder prepare writes: which folder it may replace, what a killed run left beside it, and what a
failed write means in words.

`--data-dir` is replaced as a whole (new set built beside it, then swapped in), so prepare must only
ever replace a folder that is empty, missing, or a prepared set it wrote itself, and never one that
holds, or lies inside, one of its inputs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from codetune import atomic
from codetune.atomic import aside
from codetune.config import ConfigError
from codetune.data.report import REPORT_FILES
from codetune.data.sources import hf_args, kind_of

# Everything prepare writes into a data dir; a folder holding anything else is not (only) ours.
PREPARED_NAMES = frozenset({"manifest.json", "train", "val", "tokenizer", *REPORT_FILES})
# What a failed write of the new set tells the user to do (atomic.write_error words the cause).
ELSEWHERE = "choose another --data-dir (the new set is built beside the old one, so its disk needs room for both)"


def local_inputs(sources: list[str], decontam_files: list[str]) -> list[Path]:
    """The local files and folders a run reads (an hf:builder@FILE source's file included)."""
    paths = []
    for src in sources:
        if kind_of(src) == "hf":
            name, kw = hf_args(src)
            src = kw.get("data_files") or kw.get("data_dir") or ""
            if not src or not Path(src).expanduser().exists():
                continue  # a hub dataset or a glob: nothing in the local tree to protect by name
        paths.append(Path(src).expanduser().resolve())
    return paths + [Path(f).expanduser().resolve() for f in decontam_files]


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` that prepare did not write: empty for a missing or empty folder or a prepared set."""
    try:
        names = sorted(os.listdir(out))
    except FileNotFoundError:
        return []
    try:
        ours = "run_key" in json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):  # none, unreadable, or some other program's manifest.json
        ours = False
    return [n for n in names if n not in PREPARED_NAMES] if ours else names


def check_data_dir(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse a data dir whose replacement would delete what prepare did not make."""
    real = out.expanduser().resolve()
    for inp in inputs:
        if real == inp or inp in real.parents:
            raise ConfigError(f"--data-dir {out} {'is' if real == inp else 'is inside'} the source {inp}: prepare would "
                              "read its own output, and "
                              "replacing it would delete your files; choose a --data-dir outside every source")
        if real in inp.parents:
            raise ConfigError(f"the source {inp} is inside --data-dir {out}: replacing the prepared set would delete "
                              "it; choose a --data-dir that holds no source")
    if real.exists() and not real.is_dir():
        raise ConfigError(f"--data-dir {out} is a file; give a folder (new, empty, or one prepare made)")
    foreign = foreign_entries(real)
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"--data-dir {out} holds files prepare did not write ({shown}); prepare replaces the whole "
                          "folder, so choose a new or empty one, or pass --force to replace it (deleting them)")


def _dead(p: Path) -> bool:
    """Whether the process named in a temporary path's name is gone."""
    pid = atomic.leftover_pid(p.name)
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def clean_stale(out: Path, cache_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """Remove what runs that died (their process is gone) left: the temporary folder they were building,
    and temporary files in `cache_dirs`. A previous set that a swap had moved aside and not yet deleted
    is moved back when nothing has taken its place, else deleted. Returns the paths handled."""
    handled = []
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        if _dead(p):
            shutil.rmtree(p, ignore_errors=True)
            handled.append(p)
    for p in sorted(out.parent.glob(aside(out, "*").name)):
        if _dead(p):
            if not out.exists():
                os.replace(p, out)  # the swap died between its two renames: the old set is the good one
            else:
                shutil.rmtree(p, ignore_errors=True)
            handled.append(p)
    for d in cache_dirs:
        for p in d.glob(".*.tmp-*"):
            if _dead(p):
                p.unlink(missing_ok=True)
                handled.append(p)
    return handled


def write_error(e: OSError, out: Path, tmp: Path) -> ConfigError | None:
    """A one-line error naming the cause and the fix of an OSError met while building `tmp` to replace
    `out`, or None for an error this does not explain (then the original is the better message)."""
    where = Path(e.filename) if e.filename else tmp
    kept = f"{out} was left as it was" if out.exists() else "nothing was written"
    ours = where in (tmp, out) or where in tmp.parents or tmp in where.parents or out in where.parents
    code = atomic.error_number(e)
    if not ours:  # an input that could not be read
        if code not in (errno.EACCES, errno.EPERM):
            return None
        return ConfigError(f"cannot read {where}: {os.strerror(code)} ({errno.errorcode[code]}); fix its permissions "
                           f"or leave it out of --sources; {kept}")
    err = atomic.write_error(tmp.parent, e, ELSEWHERE)
    return None if err is None else ConfigError(f"{err}; {kept}")
