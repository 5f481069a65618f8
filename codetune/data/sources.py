"""Where documents come from: directories and git trees, JSONL and Parquet files, Hugging Face datasets.

Sources only enumerate. Files are read later inside the worker processes, so reading overlaps with
the CPU stages; records from JSONL / Parquet / HF are streamed in batches and never loaded whole.
Problems with one input (a broken Parquet file, a bad JSON line, a symlinked folder) become `Drop`s
that the pipeline counts; only a bad *configuration* raises, and it does so in `check_sources`
before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from codetune.config import ConfigError

# Folders that hold other people's code or build output, not the user's.
SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", "node_modules", "bower_components", "vendor", "vendors", "third_party",
    "thirdparty", "site-packages", "dist-packages", ".venv", "venv", "__pycache__", ".tox", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", ".idea", ".vscode",
})
HF_BUILDERS = ("parquet", "json", "csv", "text")  # hf:parquet@FILES loads local files through the same path


@dataclass
class Item:
    """One document to be processed: a file to read, or a record whose text is already here."""
    source: str
    path: str | None
    repo: str | None
    file: str | None = None  # absolute path to read, for files
    text: str | bytes | None = None  # content, for records
    license: str | None = None
    messages: tuple | None = None  # a conversation (chat.Message records), for prompt/response rows

    @property
    def kind(self) -> str:
        return "code" if self.messages is None else "chat"


@dataclass
class Drop:
    """An input that could not even be enumerated, counted under `reason`."""
    source: str
    path: str
    reason: str
    kind: str = "code"  # "chat" for a row of a prompt/response source


@dataclass
class Columns:
    content: str
    path: str | None = None
    repo: str | None = None
    license: str | None = None
    format: str = "code"  # a chat.FORMATS shape, resolved per source (resolve())
    body: tuple[str, ...] = ()  # the columns of that shape present in the source; () = (content,)

    def names(self) -> list[str]:
        return [c for c in (*(self.body or (self.content,)), self.path, self.repo, self.license) if c]


def kind_of(src: str) -> str:
    if src.startswith("hf:"):
        return "hf"
    low = src.lower()
    if low.endswith((".jsonl", ".jsonl.gz", ".json")):
        return "jsonl"
    if low.endswith(".parquet"):
        return "parquet"
    return "path"


def check_sources(sources: list[str], cols: Columns, requested: str = "auto") -> None:
    """Fail fast on a missing source, a tabular source of no known shape, or a column it lacks."""
    if not sources:
        raise ConfigError("no sources: pass directories, git trees, .jsonl/.parquet files or hf:NAME datasets "
                          "(e.g. --sources ~/code/myrepo)")
    for src in sources:
        kind = kind_of(src)
        if kind != "hf" and not Path(src).expanduser().exists():
            raise ConfigError(f"source {src!r} does not exist; give a directory, a git tree, a .jsonl or .parquet "
                              "file, or hf:NAME")
        names = column_names(src)
        if names is not None:
            _check_columns(src, names, _shaped(src, names, cols, requested))


def column_names(src: str) -> list[str] | None:
    """A tabular source's columns (from its schema or first row); None for a folder, or for a file
    too damaged to tell (bad input, not bad configuration: counted when read)."""
    import pyarrow.parquet as pq

    kind, p = kind_of(src), Path(src).expanduser()
    if kind == "hf":
        return _hf_names(src)
    if kind == "parquet":
        try:
            return pq.read_schema(p).names
        except Exception:
            return None
    if kind == "jsonl":
        try:
            first = _first_json_line(p)
        except (OSError, EOFError, zlib.error):  # damaged (e.g. a truncated .gz)
            if not os.access(p, os.R_OK):
                raise ConfigError(f"source {src!r} cannot be read (permission denied); fix its permissions or "
                                  "leave it out of --sources") from None
            return None
        return list(first) if first is not None else None
    return None


def _shaped(src: str, names: list[str], cols: Columns, requested: str) -> Columns:
    from codetune.data import chat

    fmt, body = chat.detect(src, names, requested, cols.content)
    return dataclasses.replace(cols, format=fmt, body=body if fmt != "code" else ())


def resolve(src: str, cols: Columns, requested: str = "auto") -> Columns:
    """The columns to read `src` with, its row shape included (a folder is always code)."""
    names = column_names(src) if kind_of(src) != "path" else None
    if names is None:
        return cols
    return _shaped(src, names, cols, requested)


def _check_columns(src: str, names: list[str], cols: Columns) -> None:
    missing = [c for c in cols.names() if c not in names]
    if missing:
        raise ConfigError(f"source {src!r} has no column {missing[0]!r} (columns: {', '.join(names)}); "
                          f"set --content-column / --path-column / --repo-column / --license-column")


def _first_json_line(p: Path) -> dict | None:
    opener = _open_text(p)
    with opener as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return None  # counted per line later
                return obj if isinstance(obj, dict) else None
    return None


def _open_text(p: Path):
    if p.name.endswith(".gz"):
        import gzip

        return gzip.open(p, "rt", encoding="utf-8", errors="replace")
    return open(p, encoding="utf-8", errors="replace")


def iter_source(src: str, cols: Columns, batch_rows: int = 512) -> Iterator[Item | Drop]:
    kind = kind_of(src)
    if kind == "hf":
        yield from iter_hf(src, cols)
    elif kind == "jsonl":
        yield from iter_jsonl(src, cols)
    elif kind == "parquet":
        yield from iter_parquet(src, cols, batch_rows)
    elif Path(src).expanduser().is_file():
        p = Path(src).expanduser()
        yield Item(src, p.name, None, file=str(p))
    else:
        yield from iter_tree(src)


# ---------------------------------------------------------------------------------------------
# Directories and git trees


def iter_tree(src: str) -> Iterator[Item | Drop]:
    """Walk a directory in sorted order. A git work tree (here or below) is listed by git itself so
    .gitignore is honoured exactly; other folders honour their .gitignore files through pathspec."""
    root = Path(src).expanduser().resolve()
    yield from _walk(src, root, root, repo=None, ignores=[])


def _walk(src: str, root: Path, d: Path, repo: str | None, ignores: list) -> Iterator[Item | Drop]:
    if (d / ".git").exists():
        yield from _git_files(src, root, d)
        return
    ignores = ignores + _gitignore(d)
    root_str = str(root)
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError as e:
        yield Drop(src, str(d), _errno_reason(e))
        return
    for e in entries:
        rel = _rel(e.path, root_str)
        if _ignored(ignores, e.path, e.is_dir(follow_symlinks=False)):
            continue
        if e.is_symlink() and _points_to_dir(e.path):
            yield Drop(src, rel, "symlinked_dir")  # not followed: loops and trees outside the source
            continue
        if e.is_dir(follow_symlinks=False):
            if e.name not in SKIP_DIRS:
                yield from _walk(src, root, Path(e.path), repo, ignores)
        else:
            yield Item(src, rel, repo, file=e.path)


def _git_files(src: str, root: Path, repo_dir: Path) -> Iterator[Item | Drop]:
    repo = os.path.relpath(repo_dir, root) if repo_dir != root else root.name
    try:
        out = subprocess.run(["git", "-C", str(repo_dir), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError):
        # not a usable git tree (git missing, corrupt .git): walk it as a plain folder
        yield from _walk_plain(src, root, repo_dir, repo)
        return
    for rel in sorted(x for x in out.decode("utf-8", "surrogateescape").split("\0") if x):
        parts = rel.split("/")
        if any(p in SKIP_DIRS for p in parts[:-1]):
            continue
        full = repo_dir / rel
        if full.is_symlink() and _points_to_dir(str(full)):
            yield Drop(src, os.path.relpath(full, root), "symlinked_dir")
            continue
        yield Item(src, os.path.relpath(full, root), repo, file=str(full))


def _points_to_dir(path: str) -> bool:
    """False for loops and dangling links too: those are files to the reader, which counts them."""
    try:
        return os.path.isdir(path)
    except OSError:
        return False


def _walk_plain(src, root, d, repo):
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(x for x in dirnames if x not in SKIP_DIRS)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            yield Item(src, os.path.relpath(full, root), repo, file=full)


def _gitignore(d: Path) -> list:
    f = d / ".gitignore"
    if not f.is_file():
        return []
    import pathspec

    try:
        return [(str(d), pathspec.GitIgnoreSpec.from_lines(f.read_text(errors="replace").splitlines()))]
    except (OSError, ValueError):
        return []


def _rel(path: str, base: str) -> str:
    """os.path.relpath for a path the walk built below `base` (joined names, no "." or ".." parts),
    where it is just the tail: relpath normalises both paths first, which made it half of the walk's
    time (the walk runs twice per prepare: once for the input fingerprint, once for the work)."""
    prefix = base if base.endswith("/") else base + "/"
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, base)


def _ignored(ignores: list, path: str, is_dir: bool) -> bool:
    for base, spec in ignores:
        rel = _rel(path, base) + ("/" if is_dir else "")
        if spec.match_file(rel):
            return True
    return False


def _errno_reason(e: OSError) -> str:
    import errno

    return {errno.EACCES: "permission_denied", errno.EPERM: "permission_denied", errno.ELOOP: "symlink_loop",
            errno.ENOENT: "broken_symlink", errno.EISDIR: "not_a_file"}.get(e.errno, "unreadable")


# ---------------------------------------------------------------------------------------------
# Tabular sources


def _record(src: str, row: dict, cols: Columns, n: int) -> Item | Drop:
    path = row.get(cols.path) if cols.path else None
    if cols.format != "code":
        from codetune.data.chat import to_messages

        msgs = to_messages(row, cols.format)
        if isinstance(msgs, str):
            return Drop(src, str(path or f"row {n}"), msgs, kind="chat")
        return Item(src, str(path) if path is not None else None,
                    str(row[cols.repo]) if cols.repo and row.get(cols.repo) is not None else None, messages=msgs,
                    license=str(row[cols.license]) if cols.license and row.get(cols.license) else None)
    text = row.get(cols.content)
    if not isinstance(text, (str, bytes)):
        return Drop(src, str(path or f"row {n}"), "no_content")
    return Item(src, str(path) if path is not None else None,
                str(row[cols.repo]) if cols.repo and row.get(cols.repo) is not None else None,
                text=text, license=str(row[cols.license]) if cols.license and row.get(cols.license) else None)


def iter_jsonl(src: str, cols: Columns) -> Iterator[Item | Drop]:
    n = 0
    try:
        with _open_text(Path(src).expanduser()) as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield Drop(src, f"line {n + 1}", "bad_json")
                    continue
                yield _record(src, row, cols, n) if isinstance(row, dict) else Drop(src, f"line {n + 1}", "bad_json")
    except (OSError, EOFError, zlib.error):  # a damaged .gz: keep what was read, count the rest once
        yield Drop(src, f"{src} after line {n}", "broken_jsonl")


def iter_parquet(src: str, cols: Columns, batch_rows: int) -> Iterator[Item | Drop]:
    import pyarrow.parquet as pq

    n = 0
    try:
        pf = pq.ParquetFile(Path(src).expanduser())
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols.names()):
            for row in batch.to_pylist():
                yield _record(src, row, cols, n)
                n += 1
    except Exception:  # a damaged file or row group: keep what was read, count the rest once
        yield Drop(src, f"{src} after row {n}", "broken_parquet")


def hf_args(src: str) -> tuple[str, dict]:
    """hf:NAME[@DATA] -> load_dataset arguments. For the generic builders (parquet, json, ...) DATA is
    data_files (a local file works offline); for hub datasets it is data_dir."""
    name, _, data = src[3:].partition("@")
    kw: dict = {"split": "train", "streaming": True}
    if data:
        kw["data_files" if name in HF_BUILDERS else "data_dir"] = data
    return name, kw


def _hf_names(src: str) -> list[str] | None:
    """Open the stream and read one row: a wrong name or column fails here, not mid-run."""
    import datasets

    if not src[3:]:
        raise ConfigError(f"source {src!r}: write hf:NAME (e.g. hf:bigcode/the-stack-smol) or hf:parquet@FILE")
    name, kw = hf_args(src)
    try:
        row = next(iter(datasets.load_dataset(name, **kw)), None)
    except Exception as e:
        raise ConfigError(f"source {src!r}: cannot open the dataset ({type(e).__name__}: {e}); check the name, "
                          "or download it and use hf:parquet@FILES") from None
    return list(row) if row is not None else None


def iter_hf(src: str, cols: Columns) -> Iterator[Item | Drop]:
    import datasets

    name, kw = hf_args(src)
    try:
        ds = datasets.load_dataset(name, **kw)
        for n, row in enumerate(ds):
            yield _record(src, row, cols, n)
    except Exception as e:  # network, missing dataset, broken file: one counted failure for the source
        yield Drop(src, f"{src}: {type(e).__name__}", "hf_load_failed")
