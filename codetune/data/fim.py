"""Stage 8: fill-in-the-middle. A document is cut at two random character positions into prefix,
middle and suffix and rewritten as PSM (prefix, suffix, then middle to predict) or SPM (suffix first),
the formats stable-code-3b (and Qwen2.5-Coder) were trained with, written with the model family's FIM
tokens (model/arch/: `<fim_prefix>` for stable-code, `<|fim_prefix|>` for Qwen2.5-Coder). The model then learns to complete code given the code
after the cursor, which is what an editor plugin asks of it.

The choice for each document comes from a generator seeded by the run seed and the document's hash,
so it does not depend on worker count or processing order: re-runs give identical shards.

A sample teaches FIM only if its prefix, suffix and middle share one packed row (rows are attended to
independently). A whole file rewritten as one sample and then cut into rows mostly does not (docs/data.md
measured how often, before PIPELINE_VERSION 6, when prepare did exactly that). So a
document longer than a row is first cut at line starts into chunks that fit one (`row_chunks`), each
chunk is rewritten on its own, and the packer never splits a FIM sample that fits a row
(data/shards.Packer). Both ask `sample_budget` how much code a sample may hold.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from codetune import registry
from codetune.config import ConfigError
from codetune.model.arch import SpecialTokens


@dataclass(frozen=True)
class FimPieces:
    """What the tokenizer stage encodes: text pieces, each preceded by a FIM token (or none)."""
    mode: str  # "none", "psm" or "spm"
    parts: tuple[tuple[str | None, str], ...]  # (special token or None, text)


def check_fim_tokens(tok, fim_rate: float, tokens: SpecialTokens | None = None) -> None:
    """Each FIM string (of `tokens`; stable-code's if None) must be one token, or FIM training data is
    silently garbage. Checked first."""
    if fim_rate <= 0:
        return
    for s in (tokens or registry.default_tokens()).fim():
        ids = tok.encode(s, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError(f"fim_rate={fim_rate} but the tokenizer splits {s!r} into {len(ids)} tokens {ids}: "
                              "use a tokenizer with the model's FIM tokens (its own) or set --fim-rate 0")


def fim_split(text: str, key: str, fim_rate: float, spm_rate: float, seed: int = 0,
              tokens: SpecialTokens | None = None) -> FimPieces:
    pre_tok, suf_tok, mid_tok = (tokens or registry.default_tokens()).fim()
    rng = random.Random(f"{seed}:{key}")
    if len(text) < 2 or rng.random() >= fim_rate:
        return FimPieces("none", ((None, text),))
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    pre, mid, suf = text[:a], text[a:b], text[b:]
    if rng.random() < spm_rate:
        # SPM as in stable-code / StarCoder: <fim_prefix><fim_suffix>suffix<fim_middle>prefix+middle
        return FimPieces("spm", ((pre_tok, ""), (suf_tok, suf), (mid_tok, pre + mid)))
    return FimPieces("psm", ((pre_tok, pre), (suf_tok, suf), (mid_tok, mid)))


FIM_OVERHEAD = 4  # tokens a FIM sample adds to its code: the three FIM tokens and the EOS after the middle


CUT_SLACK = 4  # the pieces are encoded apart: each of the two cuts can split a token (and its merges) in two


def sample_budget(seq_len: int) -> int:
    """Tokens of code (as counted whole) one FIM sample may hold so that the sample fits one packed row."""
    return seq_len - FIM_OVERHEAD - CUT_SLACK


def row_chunks(text: str, budget: int, count: Callable[[list[str]], list[int]]) -> list[str]:
    """`text` whole when it fits `budget` tokens, else cut at line starts into consecutive chunks of at most
    `budget` tokens, of about equal size (the fewest that fit). `count` gives the token count of each of a
    list of texts; lines are counted one by one, which overestimates a little (no merge across a line
    break), so chunks err short. A single line longer than the budget stays one chunk."""
    if budget <= 0 or len(text.encode("utf-8", "surrogatepass")) <= budget:  # a token covers >= 1 byte
        return [text]
    lines = text.splitlines(keepends=True)
    sizes = count(lines)
    total = sum(sizes)
    if total <= budget:
        return [text]
    target = total / -(-total // budget)  # k equal parts, k the fewest that fit
    out, cur, n = [], [], 0
    for line, m in zip(lines, sizes):
        if cur and (n + m > budget or n + m / 2 > target):
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += m
    out.append("".join(cur))
    return out


def render(p: FimPieces) -> str:
    return "".join((tok or "") + text for tok, text in p.parts)


def undo_fim(s: str, tokens: SpecialTokens | None = None) -> str:
    """The original document from a rendered FIM sample (PSM or SPM); plain text is returned as is."""
    pre_tok, suf_tok, mid_tok = (tokens or registry.default_tokens()).fim()
    if not s.startswith(pre_tok):
        return s
    body = s[len(pre_tok):]
    head, _, tail = body.partition(suf_tok)
    suffix, _, rest = tail.partition(mid_tok)
    if head == "":  # SPM (or PSM with an empty prefix: the same string, and the same answer)
        return rest + suffix
    return head + rest + suffix
