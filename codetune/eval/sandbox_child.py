"""First stage of a sandboxed run, inside the child process: trusted code that applies the limits and
then replaces itself with a fresh interpreter running the untrusted program.

Limits are set here rather than in a `preexec_fn`, because the harness launches children from a thread
pool and `preexec_fn` is not safe in a threaded parent. rlimits and the uid survive `execv`, so the
untrusted program starts already confined. Usage (internal): python -I sandbox_child.py SPEC_JSON
"""

import ctypes
import json
import os
import resource
import sys

EXEC_FAILED = 97  # exit code meaning "the sandbox could not start the program" (not the program's fault)
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable: an unprivileged user could write there
PRIVATE_WORKDIR = "/tmp/work"  # where the work folder appears once /tmp is private
MS_NOSUID, MS_NODEV, MS_BIND = 2, 4, 4096


def private_tmp() -> None:
    """In the sandbox's own mount namespace, hide the shared temporary folders behind empty tmpfs mounts
    (gone when the sandbox ends), so writes there neither persist nor reach other processes. The work
    folder (the current directory) is bound back in at /tmp/work, so its paths stay consistent."""
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
        if libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {src} on {dst}: {os.strerror(err)}")

    keep = os.open(".", os.O_RDONLY | os.O_DIRECTORY)  # the work folder, before /tmp is covered
    for d in SHARED_TMP:
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    os.mkdir(PRIVATE_WORKDIR)
    mount(f"/proc/self/fd/{keep}", PRIVATE_WORKDIR, None, MS_BIND, None)
    os.close(keep)
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
        if spec.get("private_tmp"):
            private_tmp()
    except OSError as e:
        print(f"sandbox: {e}", file=sys.stderr)
        os._exit(EXEC_FAILED)
    if spec.get("uid") is not None:
        # Root ignores RLIMIT_NPROC and may write anywhere: become an unprivileged user for good
        # (real, effective and saved ids, no supplementary groups), so neither can be undone.
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    try:
        os.execve(spec["python"], [spec["python"], "-I", "-B", spec["program"]], spec["env"])
    except OSError as e:
        print(f"sandbox: cannot start {spec['python']}: {e}", file=sys.stderr)
        os._exit(EXEC_FAILED)


if __name__ == "__main__":
    main()
