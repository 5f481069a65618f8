"""The trusted judge, outside the sandbox: runs a problem's tests against a function that lives in the
sandbox, and alone decides whether they passed.

It runs the problem's own trusted code (helpers the tests call, the tests, `check(candidate)`) where no
untrusted code ever runs. `candidate` is a stand-in that forwards each call to the sandbox (see
sandbox_runner.py) and turns the reply back into plain built-in values. The verdict "passed" is written
only after `check(candidate)` has returned, on this process's stdout, which the program cannot reach: an
early exit, a fake success line, patched builtins or a hijacked socket in the sandbox can only make a
call fail. Usage (internal): python -I -B sandbox_judge.py FD MEMORY_BYTES < task.json > verdict.json
"""

import builtins
import ctypes
import json
import os
import resource
import socket
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sandbox_runner import decode, encode, recv, send  # noqa: E402 - the wire format is shared with the runner

PR_SET_DUMPABLE = 4
EXITS = (SystemExit, KeyboardInterrupt, GeneratorExit)


class ProgramGone(BaseException):
    """The sandboxed program ended, broke the protocol, or left the function by exiting. A BaseException,
    so that no `except Exception` in a test turns it into a pass."""


class LeftByRaising(ProgramGone):
    """The function raised SystemExit, KeyboardInterrupt or a BaseException of its own: in a single
    process that would have ended the program, so no test may catch it either."""


class ProgramError(Exception):
    """The function raised an exception of the program's own class (not a built-in one)."""


def raise_like(name: str, message: str, is_exception: bool) -> None:
    cls = getattr(builtins, name, None)
    if not is_exception or isinstance(cls, type) and issubclass(cls, BaseException) and (
            issubclass(cls, EXITS) or not issubclass(cls, Exception)):
        raise LeftByRaising(f"the function left by raising {name}")
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            err = cls(message)
        except TypeError:  # e.g. UnicodeDecodeError wants five arguments
            err = ProgramError(f"{name}: {message}")
        raise err
    raise ProgramError(f"{name}: {message}")


def remote(sock: socket.socket, entry: str):
    def candidate(*args, **kwargs):
        try:
            send(sock, {"args": encode(list(args)), "kwargs": {k: encode(v) for k, v in kwargs.items()}})
            reply = recv(sock)
        except (OSError, ValueError, RecursionError) as e:
            raise ProgramGone(f"the program broke off a call to {entry}: {e}") from None
        if reply is None:
            raise ProgramGone(f"the program ended during a call to {entry}")
        if "raised" in reply:
            raise_like(str(reply["raised"]), str(reply.get("message", "")), reply.get("exception") is True)
        try:
            return decode(reply["value"])
        except (KeyError, ValueError, TypeError, RecursionError, OverflowError) as e:
            raise ProgramGone(f"the program answered a call to {entry} with malformed data ({e})") from None

    candidate.__name__ = entry
    return candidate


def where(exc: BaseException) -> str:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<test>"]
    return f" (test line {lines[-1]})" if lines else ""


def judge(task: dict, sock: socket.socket) -> dict:
    try:
        hello = recv(sock)
    except (OSError, ValueError, RecursionError) as e:
        return {"passed": False, "gone": True, "loaded": False, "reason": f"protocol error at start: {e}"}
    if hello is None:
        return {"passed": False, "gone": True, "loaded": False,
                "reason": "the program ended before its function could be called"}
    if hello.get("loaded") is not True:
        what = (f"the program raised {hello['raised']}: {hello.get('message')} before its function could be called"
                if "raised" in hello else "the program broke the protocol before its function could be called")
        return {"passed": False, "gone": False, "loaded": False, "reason": what[:300]}
    entry = task["entry_point"]
    candidate = remote(sock, entry)
    ns = {"__name__": "__judge__"}
    try:
        exec(compile(task["support"], "<support>", "exec"), ns)
    except Exception as e:  # noqa: BLE001 - trusted code that fails is the harness's problem, not the program's
        return {"passed": False, "error": f"the problem's own code failed: {type(e).__name__}: {e}"}
    ns[entry] = candidate  # a test that names the function directly must call the program's, too
    try:
        exec(compile(task["test"], "<test>", "exec"), ns)
        ns["check"](candidate)
    except ProgramGone as e:
        return {"passed": False, "gone": type(e) is ProgramGone, "loaded": True, "reason": str(e)}
    except BaseException as e:  # noqa: BLE001 - any way check() does not return is a failure
        return {"passed": False, "gone": False, "loaded": True,
                "reason": (f"{type(e).__name__}: {e}".rstrip(": ") + where(e))[:300]}
    return {"passed": True, "loaded": True, "reason": ""}


def main() -> None:
    fd, memory = int(sys.argv[1]), int(sys.argv[2])
    # A program running as this same user must not be able to read or rewrite this process's memory
    # (ptrace, /proc/PID/mem): not dumpable means that takes a capability it does not have.
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    task = json.load(sys.stdin)
    verdict_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the tests print goes to stderr, never into the verdict
    verdict = judge(task, socket.socket(fileno=fd))
    verdict_out.write(json.dumps(verdict))
    verdict_out.flush()


if __name__ == "__main__":
    main()
