"""Stage 8: fill-in-the-middle. A document is cut at two random character positions into prefix,
middle and suffix and rewritten as PSM (prefix, suffix, then middle to predict) or SPM (suffix first),
the formats stable-code-3b was trained with. The model then learns to complete code given the code
after the cursor, which is what an editor plugin asks of it.

The choice for each document comes from a generator seeded by the run seed and the document's hash,
so it does not depend on worker count or processing order: re-runs give identical shards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from codetune.config import ConfigError
from codetune.registry import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX


@dataclass(frozen=True)
class FimPieces:
    """What the tokenizer stage encodes: text pieces, each preceded by a FIM token (or none)."""
    mode: str  # "none", "psm" or "spm"
    parts: tuple[tuple[str | None, str], ...]  # (special token or None, text)


def check_fim_tokens(tok, fim_rate: float) -> None:
    """Each FIM string must be one token, or FIM training data is silently garbage. Checked first."""
    if fim_rate <= 0:
        return
    for s in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE):
        ids = tok.encode(s, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"fim_rate={fim_rate} but the tokenizer splits {s!r} into {len(ids)} tokens {ids}: "
                              "use a tokenizer with FIM tokens (stable-code-3b's own) or set --fim-rate 0")


def fim_split(text: str, key: str, fim_rate: float, spm_rate: float, seed: int = 0) -> FimPieces:
    rng = random.Random(f"{seed}:{key}")
    if len(text) < 2 or rng.random() >= fim_rate:
        return FimPieces("none", ((None, text),))
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    pre, mid, suf = text[:a], text[a:b], text[b:]
    if rng.random() < spm_rate:
        # SPM as in stable-code / StarCoder: <fim_prefix><fim_suffix>suffix<fim_middle>prefix+middle
        return FimPieces("spm", ((FIM_PREFIX, ""), (FIM_SUFFIX, suf), (FIM_MIDDLE, pre + mid)))
    return FimPieces("psm", ((FIM_PREFIX, pre), (FIM_SUFFIX, suf), (FIM_MIDDLE, mid)))


def render(p: FimPieces) -> str:
    return "".join((tok or "") + text for tok, text in p.parts)


def undo_fim(s: str) -> str:
    """The original document from a rendered FIM sample (PSM or SPM); plain text is returned as is."""
    if not s.startswith(FIM_PREFIX):
        return s
    body = s[len(FIM_PREFIX):]
    head, _, tail = body.partition(FIM_SUFFIX)
    suffix, _, rest = tail.partition(FIM_MIDDLE)
    if head == "":  # SPM (or PSM with an empty prefix: the same string, and the same answer)
        return rest + suffix
    return head + rest + suffix
