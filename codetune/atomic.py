"""Never overwrite good output in place: everything codetune writes (shards, checkpoints, adapters,
merged models) is built in a temporary folder beside its target and swapped in with this."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`. An existing `dst` is renamed aside first and deleted only
    after the new one is in place, so at every instant one complete version exists on disk."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
