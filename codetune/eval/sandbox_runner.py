"""Inside the sandbox: loads the untrusted program and answers the judge's calls to its function.

The tests never run here. The judge (sandbox_judge.py, a separate trusted process outside the sandbox)
runs `check(candidate)`, and each `candidate(*args)` becomes one request over a socket: this process
calls the function and sends back the value it returned or the exception it raised. Whatever the program
does in this process — exit early, patch builtins, fake output, take over the socket — can only change
the *data* the judge receives, and the judge decides on that data alone.

This file is copied into the sandbox and run by the sandbox's interpreter, so it uses only the standard
library; the judge imports the codec below from it, so both ends share one wire format.
Usage (internal): python -I -B runner.py PROGRAM ENTRY_POINT FD
"""

import json
import math
import struct
import sys

MAX_MESSAGE = 16 * 2**20  # bytes; a longer message is a protocol error (the judge's memory stays bounded)
HEADER = struct.Struct(">I")
_TAGS = {"t": tuple, "s": set, "fs": frozenset}


class Opaque:
    """What the judge gets for a value of a type the wire does not carry (a generator, a custom class):
    equal only to itself, so no test comparison can be forged with a custom __eq__."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object from the sandbox>"


def encode(x):
    """A Python value as plain JSON data, keeping the types a test can tell apart (tuple vs list, int
    vs float vs bool). Ints and floats travel as hex: exact, and linear-time to parse at any size."""
    if x is None or isinstance(x, bool):
        return bool(x) if x is not None else None
    if isinstance(x, int):
        return {"i": hex(int(x))}
    if isinstance(x, float):
        return {"f": float(x).hex() if math.isfinite(x) else repr(float(x))}
    if isinstance(x, str):
        return str.__str__(x)
    if isinstance(x, (bytes, bytearray)):
        return {"b": bytes(x).hex()}
    if isinstance(x, complex):
        return {"c": [encode(x.real), encode(x.imag)]}
    if isinstance(x, list):
        return [encode(v) for v in list(x)]
    if isinstance(x, dict):
        return {"d": [[encode(k), encode(v)] for k, v in dict(x).items()]}
    for tag, kind in _TAGS.items():
        if isinstance(x, kind):
            return {tag: [encode(v) for v in kind(x)]}
    if hasattr(x, "tolist"):  # numpy scalars and arrays: compare like the plain values they hold
        return encode(x.tolist())
    return {"o": type(x).__name__}


def decode(j):
    """Inverse of `encode`, building only plain built-in values (never anything with behaviour of its
    own). Raises ValueError on anything that `encode` cannot have produced."""
    if j is None or isinstance(j, (bool, str)):
        return j
    if isinstance(j, list):
        return [decode(v) for v in j]
    if not isinstance(j, dict) or len(j) != 1:
        raise ValueError(f"not an encoded value: {type(j).__name__}")
    (tag, v), = j.items()
    if tag == "i" and isinstance(v, str):
        return int(v, 16)
    if tag == "f" and isinstance(v, str):
        return float.fromhex(v) if v not in ("inf", "-inf", "nan") else float(v)
    if tag == "b" and isinstance(v, str):
        return bytes.fromhex(v)
    if tag == "c" and isinstance(v, list) and len(v) == 2:
        return complex(float(decode(v[0])), float(decode(v[1])))
    if tag in _TAGS and isinstance(v, list):
        return _TAGS[tag](decode(e) for e in v)
    if tag == "d" and isinstance(v, list):
        return {decode(k): decode(val) for k, val in v}
    if tag == "o" and isinstance(v, str):
        return Opaque(v[:100])
    raise ValueError(f"unknown tag {tag!r}")


def send(sock, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(HEADER.pack(len(data)) + data)


def recv(sock) -> dict | None:
    """One message, or None at end of stream. Raises ValueError for a malformed or oversized one."""
    head = _read(sock, HEADER.size)
    if head is None:
        return None
    (n,) = HEADER.unpack(head)
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes exceeds {MAX_MESSAGE}")
    data = _read(sock, n)
    if data is None:
        raise ValueError("stream ended inside a message")
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise ValueError("message is not an object")
    return msg


def _read(sock, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise ValueError("stream ended inside a message")
            return None
        buf += chunk
    return bytes(buf)


def raised(e: BaseException) -> dict:
    try:
        message = str(e)[:500]
    except BaseException:  # noqa: BLE001 - a hostile __str__ only loses its own message
        message = "?"
    return {"raised": type(e).__name__[:100], "message": message, "exception": isinstance(e, Exception)}


def main() -> None:
    import socket

    program, entry, fd = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sock = socket.socket(fileno=fd)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        with open(program) as f:
            code = compile(f.read(), program, "exec")
        exec(code, namespace)
        fn = namespace[entry]
    except BaseException as e:  # noqa: BLE001 - whatever the program raised is its failure, reported as such
        send(sock, {"loaded": False, **raised(e)})
        return
    send(sock, {"loaded": True})
    while (req := recv(sock)) is not None:
        try:
            value = fn(*decode(req["args"]), **{k: decode(v) for k, v in req["kwargs"].items()})
            reply = {"value": encode(value)}
        except BaseException as e:  # noqa: BLE001
            reply = raised(e)
        send(sock, reply)


if __name__ == "__main__":
    main()
