"""One unprivileged uid per running sample, so no sample can spend another's process quota.

RLIMIT_NPROC counts every process of a uid on the machine. With one shared sandbox user, a fork bomb in
one sample made concurrent, correct samples fail to start (EAGAIN). Each sample therefore runs as a uid
of its own from a reserved range, held by an exclusive lock on a file named after it while the sample
runs: two samples — of this process or of any other eval on the machine — never hold the same uid.
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# 2^31 - 2^24: far above the ids distributions hand out (below 60000, systemd's dynamic users up to
# 65519, container ranges starting at 524288) and below 2^31, which some tools mishandle.
UID_BASE = 2**31 - 2**24
UID_SLOTS = 2**16


def lock_dir() -> Path | None:
    """The folder of per-uid lock files, made by (and only writable by) this user; None if someone else
    made it, since then the locks could not be trusted."""
    d = Path(tempfile.gettempdir()) / f"codetune-sandbox-uids-{os.geteuid()}"
    try:
        d.mkdir(mode=0o700, exist_ok=True)
        st = d.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return d


def kill_all_of(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) sent *as* that uid reaches exactly those. Needed only
    without a PID namespace, where a program's child can leave the process group the harness kills."""
    subprocess.run([sys.executable, "-I", "-S", "-c",
                    f"import os; os.setresuid({uid}, {uid}, {uid}); os.kill(-1, 9)"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextmanager
def sample_uid(prot) -> Iterator[int | None]:
    """The uid the next sample runs as: `prot.uid` itself unless each sample gets its own, then a free
    one from the range, reserved until the `with` block ends."""
    d = lock_dir() if prot.uid_per_sample else None
    if d is None:
        yield prot.uid
        return
    for slot in range(UID_SLOTS):  # lowest free first: as many lock files as samples ever ran at once
        uid = UID_BASE + slot
        fd = os.open(d / str(uid), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            if not prot.pid_namespace:
                kill_all_of(uid)  # nothing a sample left behind may meet the next sample of this uid
            os.close(fd)  # closing releases the lock
        return
    raise RuntimeError(f"all {UID_SLOTS} sandbox uids are in use")
