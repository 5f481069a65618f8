"""Stage 7: train / validation split by the coarsest unit that can give the asked share.

Files of one repository share names, helpers and style; if they straddled the split, validation loss
would reward memorising the repository. So the split unit is the repository when there are enough of
them for `--val-fraction`. With too few (the common case: one repository), it is the directory, then
the file: a looser guard against leakage, but a real validation set instead of none. Whatever the
unit, near-duplicates that were kept (`--no-near-dedup`) form one unit with each other, so a copy never
sits on the other side of its original.

A document's owner is its repository; without one (a plain folder, a JSONL file without a repository
column) it is the source it came from, so one plain folder counts as one repository too.

The choice is by hash, not by seed or input order: units are ranked by the SHA-256 of their name and
taken into validation in that order, skipping any that would overshoot the asked share by more than
TOLERANCE, until the share is reached. So the same inputs always give the same split, and a unit keeps
its side as the corpus grows unless it sits at the boundary.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

import numpy as np

from codetune.config import ConfigError

LEVELS = ("repository", "directory", "file")  # coarsest first
TOLERANCE = 0.5  # a level is used when its val share is within +-50 % of the asked fraction


@dataclass(frozen=True)
class UnitKeys:
    """64-bit hashes of a document's unit at each level, in the order of LEVELS."""
    repository: int
    directory: int
    file: int

    def values(self) -> tuple[int, int, int]:
        return self.repository, self.directory, self.file


def _h64(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")


def unit_keys(source: str, repo: str | None, path: str | None, content_key: bytes) -> UnitKeys:
    owner = f"repo:{repo}" if repo else f"source:{source}"
    file = f"{owner}/{path}" if path else f"{owner}#{content_key.hex()}"  # a record without a path: itself
    directory = f"{owner}/{posixpath.dirname(path)}/" if path else file
    return UnitKeys(_h64(owner), _h64(directory), _h64(file))


@dataclass
class SplitPlan:
    """Which documents go to validation, and how that was decided (recorded in the manifest)."""
    unit: str  # one of LEVELS, or "none" (--val-fraction 0: no validation)
    val: np.ndarray  # bool per document, in input order
    val_fraction: float
    val_share: float  # of tokens
    units: int  # units at the chosen level
    val_units: int
    units_per_level: dict  # level -> units, for each level looked at
    note: str  # why not a coarser unit, or what "none" means

    def to_manifest(self) -> dict:
        return {"unit": self.unit, "val_fraction": self.val_fraction, "val_share": round(self.val_share, 4),
                "units": self.units, "val_units": self.val_units, "units_per_level": self.units_per_level,
                "note": self.note}


def _units(keys: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Unit label per document and each unit's rank key: documents sharing a key or a near-duplicate
    group are one unit, ranked by the smallest key among them."""
    uniq, label = np.unique(keys, return_inverse=True)
    if groups is None:
        return label, uniq
    parent = list(range(len(uniq)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first: dict[int, int] = {}
    for g, u in zip(groups.tolist(), label.tolist()):
        a, b = find(first.setdefault(g, u)), find(u)
        if a != b:
            parent[max(a, b)] = min(a, b)  # uniq is sorted: a root is its unit's smallest key
    roots, label = np.unique([find(u) for u in label.tolist()], return_inverse=True)
    return label, uniq[roots]


def _take(rank: np.ndarray, weight: np.ndarray, fraction: float, best_effort: bool) -> np.ndarray:
    """Units taken into validation, in rank order, up to the target share."""
    total = float(weight.sum())
    target, cap = fraction * total, fraction * total * (1 + TOLERANCE)
    take = np.zeros(len(rank), dtype=bool)
    val = 0.0
    for i in np.argsort(rank, kind="stable").tolist():
        if val >= target:
            break
        if val + weight[i] <= cap and val + weight[i] < total:
            take[i] = True
            val += float(weight[i])
    if best_effort and not take.any() and len(rank) > 1:  # every unit overshoots: the smallest is closest
        take[np.lexsort((rank, weight))[0]] = True
    return take


def plan(keys: np.ndarray, weights: np.ndarray, groups: np.ndarray | None, fraction: float) -> SplitPlan:
    """`keys`: (documents, len(LEVELS)) uint64, the UnitKeys of each document; `weights`: tokens per
    document; `groups`: near-duplicate group per document, or None when there are none to keep together."""
    n = len(keys)
    if fraction == 0:
        return SplitPlan(unit="none", val=np.zeros(n, dtype=bool), val_fraction=0.0, val_share=0.0, units=0,
                         val_units=0, units_per_level={}, note="no validation split (--val-fraction 0)")
    weights = np.asarray(weights, dtype=np.float64)
    total = float(weights.sum())
    per_level: dict[str, int] = {}
    for depth, level in enumerate(LEVELS):
        label, rank = _units(keys[:, depth], groups)
        per_level[level] = len(rank)
        unit_w = np.bincount(label, weights=weights, minlength=len(rank))
        finest = depth == len(LEVELS) - 1
        take = _take(rank, unit_w, fraction, best_effort=finest)
        share = float(unit_w[take].sum()) / total if total else 0.0
        if finest or fraction * (1 - TOLERANCE) <= share <= fraction * (1 + TOLERANCE):
            break
    if not take.any():
        raise ConfigError(f"the validation split would be empty: the {n} kept document(s) are one file (or one "
                          "group of near-copies), and a split needs at least two; add sources, or pass --val-fraction 0 to prepare without validation")
    tried = ", ".join(f"{per_level[lv]} {lv} unit(s)" for lv in LEVELS[:depth])
    note = f"not by {tried}: too few or too uneven to come within {TOLERANCE:.0%} of the fraction" if tried else ""
    return SplitPlan(unit=level, val=take[label], val_fraction=fraction, val_share=share, units=len(rank),
                     val_units=int(take.sum()), units_per_level=per_level, note=note)
