"""Never overwrite good output in place: everything codetune writes (shards, checkpoints, adapters,
merged models) is built in a temporary folder beside its target and swapped in with this."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


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
