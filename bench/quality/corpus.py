"""The corpus: the Python sources of the packages installed on this machine (and the standard library),
split four ways, file by file:

- pretrain:      every package but the domain, minus the general held-out files;
- general-test:  a hash-chosen share of those packages' files, never trained on (forgetting);
- domain-train:  the held-out domain library (never in pretraining): what fine-tuning sees;
- domain-test:   a hash-chosen share of the domain's files, never trained on (the domain's score).

A file's side is decided by the SHA-256 of its package and path, so the split does not depend on the
seed, the machine's file order or the other packages. Byte-identical copies are one unit (they land on
one side together), and a copy of a domain file inside another package is dropped from the general
side, so no held-out text is trained on verbatim. Near-copies are not grouped (see docs/quality.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

SPLITS = ("pretrain", "general-test", "domain-train", "domain-test")
STDLIB = "python-stdlib"
CORPUS_JSON = "corpus.json"
MIN_FILE_BYTES, MAX_FILE_BYTES = 200, 1_000_000  # prepare drops the rest anyway
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}


@dataclass(frozen=True)
class SourceFile:
    package: str
    rel: str       # path inside the package folder
    path: Path     # where it is on this machine
    size: int
    digest: str    # of the bytes: identical copies share it

    @property
    def key(self) -> str:
        return f"{self.package}/{self.rel}"


@dataclass(frozen=True)
class Package:
    name: str
    root: Path
    files: tuple[SourceFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def rank(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def package_files(name: str, root: Path, max_bytes: int | None, parts: tuple[str, ...] = ()) -> Package:
    """The package's .py files within the size bounds (only those under its sub-folders `parts`, if given);
    past `max_bytes`, the files first in hash order (a stable sample, not the alphabetically first folders)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if parts and Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d in parts]
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            p = Path(dirpath) / fn
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if MIN_FILE_BYTES <= size <= MAX_FILE_BYTES and p.is_file():
                found.append((p, size))
    found.sort(key=lambda ps: rank(f"{name}/{ps[0].relative_to(root).as_posix()}"))
    files, total = [], 0
    for p, size in found:
        if max_bytes is not None and total + size > max_bytes:
            continue
        try:
            digest = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
        except OSError:
            continue
        files.append(SourceFile(name, p.relative_to(root).as_posix(), p, size, digest))
        total += size
    return Package(name, root, tuple(sorted(files, key=lambda f: f.rel)))


def site_dirs() -> list[Path]:
    seen, out = set(), []
    for key in ("purelib", "platlib"):
        p = Path(sysconfig.get_paths()[key]).resolve()
        if p.is_dir() and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def installed_packages() -> dict[str, Path]:
    """Top-level package folders of this interpreter's site-packages, and the standard library."""
    out: dict[str, Path] = {}
    for site in site_dirs():
        for d in sorted(site.iterdir()):
            if d.is_dir() and d.name.isidentifier() and not d.name.startswith("_") and d.name not in out:
                out[d.name] = d
    out[STDLIB] = Path(sysconfig.get_paths()["stdlib"])
    return out


@dataclass(frozen=True)
class CorpusSpec:
    domain: str
    min_package_bytes: int          # smaller packages are left out of the general side
    max_package_bytes: int | None   # per general package
    max_domain_bytes: int | None    # of the domain package
    domain_parts: tuple[str, ...]   # its sub-folders to take (empty: all of it)
    max_general_bytes: int | None   # all general packages together (largest first)
    general_test_fraction: float
    domain_test_fraction: float
    exclude: tuple[str, ...] = ("codetune",)


def choose(spec: CorpusSpec, available: dict[str, Path] | None = None) -> tuple[Package, list[Package]]:
    """(domain, general packages) as found on this machine."""
    from codetune.config import ConfigError

    available = installed_packages() if available is None else available
    if spec.domain not in available:
        near = ", ".join(sorted(available)[:12])
        raise ConfigError(f"--domain {spec.domain}: not installed here; choose an installed package (e.g. {near})")
    domain = package_files(spec.domain, available[spec.domain], spec.max_domain_bytes, spec.domain_parts)
    general = []
    for name, root in available.items():
        if name == spec.domain or name in spec.exclude:
            continue
        pkg = package_files(name, root, spec.max_package_bytes)
        if pkg.size >= spec.min_package_bytes:
            general.append(pkg)
    general.sort(key=lambda p: (-p.size, p.name))
    if spec.max_general_bytes is not None:
        kept, total = [], 0
        for p in general:
            if total + p.size <= spec.max_general_bytes:
                kept.append(p)
                total += p.size
        general = kept
    if not domain.files or not general:
        raise ConfigError(f"too little code found: domain {spec.domain} has {len(domain.files)} files and "
                          f"{len(general)} other packages qualify; install more packages or lower the limits")
    return domain, general


def general_files(domain: Package, general: list[Package]) -> tuple[list[SourceFile], int]:
    """The general side's files without copies of domain files, and how many copies were dropped."""
    domain_digests = {f.digest for f in domain.files}
    everything = [f for p in general for f in p.files]
    kept = [f for f in everything if f.digest not in domain_digests]
    return kept, len(everything) - len(kept)


def split(files: list[SourceFile], fraction: float, forced: frozenset[str] = frozenset()
          ) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, test): groups of identical files go to one side together. Groups holding a `forced` key
    (a file that execution tasks come from) are tested; then the others, by rank of their first key,
    until `fraction` of the bytes is reached. The train side keeps at least one group."""
    groups: dict[str, list[SourceFile]] = {}
    for f in files:
        groups.setdefault(f.digest, []).append(f)
    order = sorted(groups.values(), key=lambda g: (not any(f.key in forced for f in g), min(rank(f.key) for f in g)))
    total = sum(f.size for f in files)
    test, size = [], 0
    for g in order[:-1]:
        if size >= fraction * total and not any(f.key in forced for f in g):
            break
        test += g
        size += sum(f.size for f in g)
    test_keys = {f.key for f in test}
    return [f for f in files if f.key not in test_keys], test


@dataclass(frozen=True)
class Corpus:
    root: Path
    splits: dict[str, dict[str, int]]  # split -> package -> files
    bytes: dict[str, int]              # split -> bytes
    dropped_domain_copies: int

    def sources(self, name: str) -> list[str]:
        """One prepare source per package folder of the split (a package is a repository to prepare)."""
        return [str(self.root / name / pkg) for pkg in sorted(self.splits[name])]

    def folder(self, name: str) -> Path:
        return self.root / name


def build(spec: CorpusSpec, root: Path, domain: Package, general: list[Package],
          forced: frozenset[str] = frozenset(), extra: dict[str, str] | None = None) -> Corpus:
    """Copy the four splits under root/<split>/<package>/, with `extra` files (name -> text) beside them;
    written to a temporary folder and renamed into place, so a corpus folder is always complete."""
    kept, dropped = general_files(domain, general)
    pretrain, general_test = split(kept, spec.general_test_fraction, forced)
    domain_train, domain_test = split(list(domain.files), spec.domain_test_fraction, forced)
    parts = dict(zip(SPLITS, (pretrain, general_test, domain_train, domain_test)))
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, files in parts.items():
        for f in files:
            dst = tmp / name / f.package / f.rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.path, dst)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    info = {"spec": asdict(spec), "python": sys.version.split()[0],
            "packages": {p.name: {"root": str(p.root), "files": len(p.files), "bytes": p.size} for p in [domain, *general]},
            "splits": {n: _count(fs) for n, fs in parts.items()},
            "bytes": {n: sum(f.size for f in fs) for n, fs in parts.items()},
            "dropped_domain_copies": dropped,
            "files": {n: [f.key for f in fs] for n, fs in parts.items()}}
    (tmp / CORPUS_JSON).write_text(json.dumps(info, indent=1))
    os.replace(tmp, root)
    return load(root)


def _count(files: list[SourceFile]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in files:
        out[f.package] = out.get(f.package, 0) + 1
    return out


def load(root: Path) -> Corpus:
    info = json.loads((root / CORPUS_JSON).read_text())
    return Corpus(root, info["splits"], info["bytes"], info["dropped_domain_copies"])
