"""Stage 7: train / validation split by repository. Files of one repository share names, helpers and
style; if they straddled the split, validation loss would reward memorising the repository. The
hash makes the choice stable across runs and independent of order."""

from __future__ import annotations

import hashlib


def split_key(repo: str | None, path: str | None) -> str:
    return f"repo:{repo}" if repo else f"path:{path}"


def is_val(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < fraction


def split_of(repo: str | None, path: str | None, fraction: float) -> str:
    return "val" if is_val(split_key(repo, path), fraction) else "train"
