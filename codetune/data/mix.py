"""Mixing raw code and prompt/response pairs in one prepared set at stated token shares (--mix).

The kind below its share in the train split is repeated (every document a whole number of times,
plus a hash-chosen subset for the fraction) until the shares hold; nothing is dropped, so no code or
pair a user gave is lost to the mix. Validation keeps its natural make-up: repeats there would only
weight the same documents twice in the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from codetune.config import ConfigError

KINDS = ("code", "chat")
MAX_REPEAT = 100.0  # beyond this the "mix" is a handful of documents seen a hundred times: overfitting


def parse_mix(text: str) -> dict[str, float]:
    """'code=0.7,chat=0.3' -> {"code": 0.7, "chat": 0.3}; shares must be positive and sum to 1."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        try:
            share = float(value)
        except ValueError:
            share = math.nan
        if kind not in KINDS or kind in out or not (0 < share < 1):
            raise ConfigError(f"mix={text!r}: write code=SHARE,chat=SHARE with shares between 0 and 1 "
                              "(e.g. --mix code=0.7,chat=0.3)")
        out[kind] = share
    if set(out) != set(KINDS) or abs(sum(out.values()) - 1) > 1e-6:
        raise ConfigError(f"mix={text!r}: give both code and chat shares, summing to 1 (e.g. --mix code=0.7,chat=0.3)")
    return out


@dataclass(frozen=True)
class MixPlan:
    requested: dict | None  # the --mix shares, or None (as found)
    repeat: dict  # kind -> factor >= 1 applied to its train documents

    def copies(self, kind: str, key: int) -> int:
        """How many times a train document of `kind` is packed; `key` (its 64-bit file hash) picks which
        documents take the fractional extra copy, so re-runs pack the same ones."""
        f = self.repeat.get(kind, 1.0)
        whole = math.floor(f)
        return whole + (((key * 0x9E3779B97F4A7C15) % 2**64) / 2**64 < f - whole)


def plan_mix(requested: dict | None, tokens: dict[str, int]) -> MixPlan:
    """Repeat factors that bring the train tokens per kind (`tokens`) to the requested shares."""
    if requested is None:
        return MixPlan(None, {k: 1.0 for k in KINDS})
    missing = [k for k in KINDS if not tokens.get(k)]
    if missing:
        raise ConfigError(f"--mix {','.join(f'{k}={v:g}' for k, v in requested.items())} but the train split holds "
                          f"no {missing[0]} documents; add a {missing[0]} source or leave --mix out")
    # per-token weight each kind needs relative to the other; the larger one is scaled to 1
    need = {k: requested[k] / tokens[k] for k in KINDS}
    base = min(need.values())
    repeat = {k: need[k] / base for k in KINDS}
    worst = max(repeat, key=repeat.get)
    if repeat[worst] > MAX_REPEAT:
        raise ConfigError(f"--mix asks for {requested[worst]:.0%} {worst} but the train split holds {tokens[worst]:,} "
                          f"{worst} tokens beside {sum(tokens.values()) - tokens[worst]:,}: each {worst} document would "
                          f"repeat {repeat[worst]:.0f} times (at most {MAX_REPEAT:.0f}); add {worst} data or lower its share")
    return MixPlan(requested, repeat)


def to_manifest(m: MixPlan, natural: dict[str, int], packed: dict[str, int]) -> dict:
    total = sum(packed.values()) or 1
    return {"requested": m.requested, "repeat": {k: round(v, 4) for k, v in m.repeat.items()},
            "train_tokens_found": natural, "train_tokens_packed": packed,
            "train_share": {k: round(v / total, 4) for k, v in packed.items()}}


def pack_splits(staging, val, packers: dict, mix_text: str | None) -> dict:
    """Pack the staged documents into the train and val packers (val: bool per document), train
    documents as many times as the mix asks; returns the manifest's "mix" record."""
    import numpy as np

    lengths = np.frombuffer(staging.lengths, dtype=np.uint32).astype(np.int64)
    is_chat = np.frombuffer(staging.chat, dtype=np.uint8).astype(bool)
    train = ~np.asarray(val, dtype=bool)
    natural = {"code": int(lengths[train & ~is_chat].sum()), "chat": int(lengths[train & is_chat].sum())}
    m = plan_mix(parse_mix(mix_text) if mix_text else None, natural)
    packed = {k: 0 for k in KINDS}
    extra = []  # train repeats go after the first pass: one read of the staging file each
    for doc, is_val in zip(staging.documents(), np.asarray(val, dtype=bool).tolist()):
        packers["val" if is_val else "train"].add_document(doc.ids, doc.target)
        if not is_val:
            kind = "chat" if doc.chat else "code"
            n = m.copies(kind, doc.key)
            packed[kind] += len(doc.ids) * n
            extra.append(n - 1)
    if any(extra):
        train_docs = (d for d, v in zip(staging.documents(), np.asarray(val, dtype=bool).tolist()) if not v)
        for doc, n in zip(train_docs, extra):
            for _ in range(n):
                packers["train"].add_document(doc.ids, doc.target)
    return to_manifest(m, natural, packed)
