"""Never overwrite good output in place: everything codetune writes (shards, checkpoints, adapters,
merged models) is built in a temporary folder beside its target and swapped in with this."""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from codetune.config import ConfigError

# The names the writers below give their temporary and parked-aside paths (aside, temp_dir_beside,
# write_file): ".<name>.tmp-<pid>[.<suffix>]" and ".<name>.old-<pid>". Whoever cleans up after a killed
# writer asks is_leftover rather than spelling the names out again.
_LEFTOVER = re.compile(r"\.[^/]+\.(tmp|old)-(\d+)(\.\w+)?")


def is_leftover(name: str) -> bool:
    """Whether `name` is a temporary or parked-aside path one of this module's writers makes."""
    return _LEFTOVER.fullmatch(name) is not None


def leftover_pid(name: str) -> int | None:
    """The process that made the temporary or parked-aside path `name` (None: not one of ours)."""
    m = _LEFTOVER.fullmatch(name)
    return int(m.group(2)) if m else None


def temp_beside(dst: Path) -> Path:
    """The temporary path this process builds `dst` in: beside it, so the final rename stays on one file system."""
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.tmp-{os.getpid()}")


def aside(dst: Path, pid: int | str | None = None) -> Path:
    """Where replace_dir parks the previous `dst` while swapping (a pattern with pid="*")."""
    return Path(dst).with_name(f".{Path(dst).name}.old-{os.getpid() if pid is None else pid}")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`. An existing `dst` is renamed aside first and deleted only
    after the new one is in place, so at every instant one complete version exists on disk; if the second
    rename fails, the old one is moved back."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = aside(dst)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) writes the file's content to a temporary path beside `path` (same suffix, so writers that
    pick a format from it still do), which then replaces `path` in one rename: readers never see half."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, **open_kwargs) -> None:
    """`path.write_text(text)`, atomically (see write_file)."""
    write_file(path, lambda tmp: tmp.write_text(text, **open_kwargs))


def temp_dir_beside(dst: Path) -> Path:
    """A fresh empty folder beside `dst` (same file system, so replace_dir's rename is atomic), named for this
    process. Creating it up front proves the target's folder is writable before any slow work."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(dst)
    shutil.rmtree(tmp, ignore_errors=True)  # only ever this process's own name: a leftover of an earlier call
    tmp.mkdir()
    return tmp


# errno -> what to do about it; a write failing for any of these is the user's disk, not a bug
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that disk or {elsewhere}",
    errno.EDQUOT: "free space within your disk quota or {elsewhere}",
    errno.EROFS: "that file system is mounted read-only: {elsewhere}",
    errno.EACCES: "no permission to write there: fix the folder's permissions or {elsewhere}",
    errno.EPERM: "no permission to write there: fix the folder's permissions or {elsewhere}",
    errno.ENOTDIR: "part of that path is a file, not a folder: {elsewhere}",
    errno.EEXIST: "part of that path is a file, not a folder: {elsewhere}",
}


def error_number(exc: BaseException) -> int | None:
    """The OS error behind `exc`: an OSError's errno, or the code that safetensors' Rust writer
    ('... (os error 28)') and wrapped errors ('[Errno 28] ...') only give in their message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    m = re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(exc))
    return int(m.group(1) or m.group(2)) if m else None


def _short_torch_write(exc: BaseException) -> bool:
    """torch.save's zip writer on a full disk: RuntimeError('[enforce fail at inline_container.cc] . unexpected
    pos 83968 vs 83860') or 'PytorchStreamWriter failed writing file ...'."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text)


def _nearly_full(path: Path, margin: int = 16 * 2**20) -> bool:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < margin
    except OSError:
        return False


def write_error(path: Path, exc: BaseException, elsewhere: str = "write somewhere else") -> ConfigError | None:
    """A one-line ConfigError naming `path`, the cause and the fix when writing failed because of the file
    system (full, read-only, no permission); None for anything else, which is a bug and should raise as is."""
    code = error_number(exc)
    if code is None and _short_torch_write(exc) and _nearly_full(path):
        code = errno.ENOSPC  # torch.save's writer reports a full disk only as a short write, with no errno
    if code not in _WRITE_FIXES:
        return None
    fix = _WRITE_FIXES[code].format(elsewhere=elsewhere)
    return ConfigError(f"cannot write {path}: {os.strerror(code)} ({errno.errorcode[code]}); {fix}")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def ensure_free_space(path: Path, need: int, elsewhere: str = "write somewhere else") -> None:
    """Refuse before writing `need` bytes under `path` when its disk has less free: a full disk found half-way
    costs the whole write (and, for a merge, the minutes of loading before it)."""
    free = shutil.disk_usage(path).free
    if free < need:
        raise ConfigError(f"not enough space to write {path}: it needs about {gib(need)} and its disk has "
                          f"{gib(free)} free; free space there or {elsewhere}")


def own_output_dir(path: Path, marker: str, command: str, flag: str) -> Path:
    """Make `path` the output folder of `command`: a new or empty folder, or one holding `marker` (the file
    this function leaves in every folder it makes, so the command's own earlier outputs may be replaced).
    A folder with other contents, or a file, is refused in one line: nothing of the user's is written over."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file, not a folder: choose a folder for {command}'s outputs")
    if p.is_dir() and any(p.iterdir()) and not (p / marker).is_file():
        raise ConfigError(f"{flag} {p} holds files that `{command}` did not write; choose a new or empty "
                          f"{flag} (nothing was changed)")
    p.mkdir(parents=True, exist_ok=True)
    (p / marker).touch()
    return p
