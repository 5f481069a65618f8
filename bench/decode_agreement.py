"""Do two decode modes score the same? Compares the FIM items of two `codetune eval --suites fim` runs on
the same model and tasks that differ only in --eval-decode (issue 17, target 3: "same scores as the eager
path"). HumanEval on a small trained model scores ~0 either way, so it cannot show a difference; FIM exact
match on a trained model's own domain is far from 0 and 1, so it can.

    python3 bench/decode_agreement.py REF_EVAL_DIR OTHER_EVAL_DIR [--label-ref eager] [--label-other batched]

Items are matched by kind, source file and the text of prefix, middle and suffix (not by order). Prints
one JSON line: per kind, the items matched, each mode's exact-match rate and mean edit similarity, how
many predictions differ at all, how many exact matches flipped each way, and the paired change of exact
match (Newcombe) and of edit similarity (paired bootstrap), each with its 95% interval. Exit 2 with one
line when a folder has no fim.jsonl or no item matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codetune.eval import stats  # noqa: E402


def items(folder: Path) -> dict[tuple, dict]:
    path = folder / "fim.jsonl"
    if not path.is_file():
        raise SystemExit(f"bench/decode_agreement.py: {path} not found; give the --eval-dir of a "
                         "`codetune eval --suites fim` run")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            text = "\0".join((r["prefix"], r["middle"], r["suffix"])).encode()
            out[(r["kind"], r["source"], hashlib.sha256(text).hexdigest())] = r
    return out


def interval(i: stats.Interval) -> dict:
    return {"estimate": round(i.estimate, 4), "low": round(i.low, 4), "high": round(i.high, 4)}


def compare(ref: dict[tuple, dict], other: dict[tuple, dict], labels: tuple[str, str]) -> dict:
    shared = sorted(ref.keys() & other.keys())
    if not shared:
        raise SystemExit("bench/decode_agreement.py: the two runs share no FIM item; run both on the same "
                         "--fim-source, --fim-tasks and seed")
    a, b = labels
    out = {"modes": [a, b], "unmatched": len(ref.keys() ^ other.keys()), "kinds": {}}
    significant = False
    for kind in sorted({k[0] for k in shared}):
        keys = [k for k in shared if k[0] == kind]
        ex_a = [bool(ref[k]["exact"]) for k in keys]
        ex_b = [bool(other[k]["exact"]) for k in keys]
        sim_a = [float(ref[k]["edit_similarity"]) for k in keys]
        sim_b = [float(other[k]["edit_similarity"]) for k in keys]
        changes = (stats.paired_proportion_difference(ex_a, ex_b), stats.paired_bootstrap_difference(sim_a, sim_b))
        significant = significant or any(c.excludes_zero() for c in changes)
        out["kinds"][kind] = {
            "items": len(keys),
            f"exact_{a}": round(sum(ex_a) / len(keys), 4), f"exact_{b}": round(sum(ex_b) / len(keys), 4),
            f"edit_similarity_{a}": round(sum(sim_a) / len(keys), 4),
            f"edit_similarity_{b}": round(sum(sim_b) / len(keys), 4),
            "predictions_differing": sum(ref[k]["prediction"] != other[k]["prediction"] for k in keys),
            f"exact_only_{a}": sum(x and not y for x, y in zip(ex_a, ex_b)),
            f"exact_only_{b}": sum(y and not x for x, y in zip(ex_a, ex_b)),
            "exact_change": interval(changes[0]), "edit_similarity_change": interval(changes[1]),
        }
    out["same_scores"] = all(v["predictions_differing"] == 0 for v in out["kinds"].values())
    out["no_significant_change"] = not significant  # (judged on the unrounded intervals)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", type=Path, help="--eval-dir of the reference run (e.g. --eval-decode eager)")
    ap.add_argument("other", type=Path, help="--eval-dir of the run compared with it")
    ap.add_argument("--label-ref", default="eager")
    ap.add_argument("--label-other", default="batched")
    a = ap.parse_args(argv)
    try:
        result = compare(items(a.ref), items(a.other), (a.label_ref, a.label_other))
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
