"""Stage 1: bytes -> text. Binary and undecodable inputs are dropped, never guessed at: a wrong
decoding would put mojibake into the training data."""

from __future__ import annotations

import json
import os
import stat

from codetune.data.sources import _errno_reason

SNIFF = 8192  # NUL bytes in the first 8 KiB mark a binary file (git's own heuristic)


def read_file(path: str, max_bytes: int) -> tuple[bytes | None, str | None]:
    """(content, None) or (None, reason). Size is checked before reading, so a 100 MB one-line file
    costs a stat, not 100 MB of memory; non-regular files (FIFOs, devices) are never opened."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, "not_a_file"
        if st.st_size > max_bytes:
            return None, "too_large"
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        return None, _errno_reason(e)
    if len(data) > max_bytes:  # grew while we looked
        return None, "too_large"
    return data, None


def decode(data: bytes | str) -> tuple[str | None, str | None]:
    if isinstance(data, str):
        if "\0" in data[:SNIFF]:
            return None, "binary"
        if not data.isascii():
            try:  # a lone surrogate (a JSON "\ud800" escape) is not text any tokenizer can take
                data.encode("utf-8")
            except UnicodeEncodeError:
                return None, "undecodable"
        return data, None
    if b"\0" in data[:SNIFF]:
        return None, "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable"
    return text.removeprefix("\ufeff"), None


def notebook_to_script(text: str) -> str | None:
    """Jupyter notebooks as stable-code saw them ("Jupyter-Clean"): code cells as code, markdown cells
    as comments, outputs dropped. None when the JSON is not a notebook."""
    try:
        nb = json.loads(text)
        cells = nb["cells"]
    except (ValueError, KeyError, TypeError):
        return None
    parts = []
    for c in cells:
        src = c.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        if c.get("cell_type") == "markdown":
            src = "\n".join("# " + line for line in src.splitlines())
        elif c.get("cell_type") != "code":
            continue
        parts.append(src)
    return "\n\n".join(parts)
