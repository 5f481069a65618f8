"""First stage of a sandboxed run, inside the child process: trusted code that applies the limits and
then replaces itself with a fresh interpreter running the untrusted program.

Limits are set here rather than in a `preexec_fn`, because the harness launches children from a thread
pool and `preexec_fn` is not safe in a threaded parent. rlimits and the uid survive `execv`, so the
untrusted program starts already confined. Usage (internal): python -I sandbox_child.py SPEC_JSON
"""

import ctypes
import json
import os
import re
import resource
import sys

EXEC_FAILED = 97  # exit code meaning "the sandbox could not start the program" (not the program's fault)
PRIVATE_WORKDIR = "/tmp/work"  # where the program's folder is once /tmp is private
SMALL_TMP = ("/var/tmp", "/dev/shm")  # also world-writable: covered by their own small tmpfs
SMALL_TMP_BYTES = 2**20
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 23, 24, 28, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT, _KEEP_CAPS off, _NO_CAP_AMBIENT_RAISE, each with its lock bit (setuid still drops caps)
SECURE_NOROOT = 0b11 | 0b100000 | 0b11000000
# statvfs f_flag bit -> the mount flag that keeps it: a bind remount must restate the flags it keeps
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
            4096: MS_RELATIME}


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    args = [s.encode() if s is not None else None for s in (src, dst, fstype, data)]
    if libc.mount(*args[:3], ctypes.c_ulong(flags), args[3]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {dst}: {os.strerror(err)}")


def drop_privileges_for_good() -> None:
    """No capability survives the execve below, and nothing executed later can gain one: no_new_privs
    (setuid and file-capability programs run without their privileges), an empty bounding set, and
    securebits so that even uid 0 — which the program is inside a user namespace, when the harness is not
    root — gets no capabilities at exec. Without this, that uid 0 could simply unmount what hides /tmp."""
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(*args: int) -> None:
        if libc.prctl(*(ctypes.c_ulong(a) for a in args), *[ctypes.c_ulong(0)] * (5 - len(args))) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl{args}: {os.strerror(err)}")

    try:
        cap = 0
        while libc.prctl(PR_CAPBSET_READ, ctypes.c_ulong(cap), 0, 0, 0) >= 0:  # every capability there is
            prctl(PR_CAPBSET_DROP, cap)
            cap += 1
        prctl(PR_SET_SECUREBITS, SECURE_NOROOT)
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        with open("/proc/self/status") as f:  # an unprivileged launcher may not do this, and need not
            if any(ln.split() != ["CapEff:", "0" * 16] for ln in f if ln.startswith("CapEff:")):
                raise
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def mount_points() -> list[str]:
    """Every mount point of this (already private) mount namespace, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo", "rb") as f:
        fields = [line.split(b" ") for line in f]
    # field 5 is the mount point, with space, tab, newline and backslash written as octal escapes
    octal = re.compile(rb"\\([0-7]{3})")
    return [os.fsdecode(octal.sub(lambda m: bytes([int(m[1], 8)]), fs[4])) for fs in fields if len(fs) > 4]


def read_only_everywhere() -> None:
    """Make every existing mount read-only, in this namespace only: always a *bind* remount, which
    changes this namespace's view of the mount and never the filesystem itself (a plain remount would
    change it for the whole machine)."""
    for mp in dict.fromkeys(mount_points()):
        try:
            kept = os.statvfs(mp).f_flag
        except OSError:
            continue  # covered by a later mount, or gone: nothing reachable to protect
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st, ms in ST_TO_MS.items():
            if kept & st:
                flags |= ms
        try:
            _mount(None, mp, None, flags)
        except OSError as e:
            if mp == "/" or e.errno not in (2, 13):  # the root, or anything but "gone"/"hidden", must hold
                raise


def private_mounts(spec: dict) -> None:
    """In the sandbox's own mount namespace: (optionally) everything read-only and a /proc of its own PID
    namespace, then a size-bounded tmpfs at /tmp holding a copy of the program's files at /tmp/work,
    small tmpfs over the other world-writable folders, and the paths to hide covered. All of it vanishes
    with the sandbox, so the program can neither write to the host nor see its processes."""
    keep = os.open(".", os.O_RDONLY | os.O_DIRECTORY)  # the host work folder, before /tmp is covered
    if spec["read_only"]:
        read_only_everywhere()
    if spec["private_proc"]:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    safe = MS_NOSUID | MS_NODEV
    _mount("tmpfs", "/tmp", "tmpfs", safe, f"size={spec['disk_bytes']},nr_inodes={spec['max_inodes']},mode=1777")
    for d in SMALL_TMP:
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", safe, f"size={SMALL_TMP_BYTES},nr_inodes=256,mode=1777")
    for path in spec["hide"]:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", safe | MS_RDONLY, "size=4k,nr_inodes=1,mode=0")
        elif os.path.exists(path):
            _mount("/dev/null", path, None, MS_BIND)
    os.mkdir(PRIVATE_WORKDIR, 0o700)
    for name in spec["files"]:
        src = os.open(name, os.O_RDONLY, dir_fd=keep)
        with os.fdopen(src, "rb") as f, open(os.path.join(PRIVATE_WORKDIR, name), "wb") as g:
            g.write(f.read())
    os.close(keep)
    if spec["uid"] is not None:
        for p in [PRIVATE_WORKDIR, *(os.path.join(PRIVATE_WORKDIR, n) for n in spec["files"])]:
            os.chown(p, spec["uid"], spec["gid"])
    os.chdir(PRIVATE_WORKDIR)


def main() -> None:
    spec = json.loads(sys.argv[1])
    limits = [(resource.RLIMIT_AS, spec["memory_bytes"]), (resource.RLIMIT_FSIZE, spec["file_bytes"]),
              (resource.RLIMIT_NPROC, spec["max_procs"]), (resource.RLIMIT_NOFILE, spec["max_files"]),
              (resource.RLIMIT_CORE, 0)]
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    # With soft == hard the kernel sends SIGKILL at the CPU limit, which reads as an ordinary crash; a
    # hard limit one second above the soft one sends SIGXCPU first (scored "timeout"), with SIGKILL as
    # the backstop for a program that catches it.
    resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))
    os.chdir(spec["workdir"])  # before the mounts below: the work folder stays reachable as "."
    try:
        if spec["private_tmp"]:
            private_mounts(spec)
    except OSError as e:
        print(f"sandbox: {e}", file=sys.stderr)
        os._exit(EXEC_FAILED)
    try:
        drop_privileges_for_good()
    except OSError as e:
        print(f"sandbox: {e}", file=sys.stderr)
        os._exit(EXEC_FAILED)
    if spec["uid"] is not None:
        # Root ignores RLIMIT_NPROC and may write anywhere: become an unprivileged user for good
        # (real, effective and saved ids, no supplementary groups), so neither can be undone.
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    try:
        os.execve(spec["python"], [spec["python"], "-I", "-B", *spec["argv"]], spec["env"])
    except OSError as e:
        print(f"sandbox: cannot start {spec['python']}: {e}", file=sys.stderr)
        os._exit(EXEC_FAILED)


if __name__ == "__main__":
    main()
