"""Fill-in-the-middle accuracy on held-out code: hide one line (single-line) or a span of lines
(multi-line), give the model the prefix and suffix in stable-code's PSM format and let it write the
middle until EOS. Scored by exact match and edit similarity, and by the teacher-forced loss of the
reference middle with and without the suffix (eval/fim_loss.py: sensitive where a small model's exact
match sits at 0%). Fine-tuning without FIM data can silently destroy infilling while plain completion
looks fine; this suite is what notices."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from codetune import registry
from codetune.eval import fim_loss
from codetune.eval.generation import GenSettings, GenStats, generate
from codetune.eval.humaneval import write_jsonl
from codetune.model.arch import SpecialTokens

ITEMS_FILE = "fim.jsonl"  # one row per task, beside results.json; eval/report.py reads it

CONTEXT_CHARS = 4000  # prefix/suffix kept on each side (~1k tokens): the local context that matters
# (--fim-context-chars: a model trained on shorter rows than prefix + suffix + middle has never seen the
# positions such a prompt reaches, and then fails for that reason, not for want of FIM; bench/quality)
MIN_LINES = 6  # shorter documents give the model too little to infer from
MAX_FILE_BYTES = 1_000_000
KINDS = ("single_line", "multi_line")


@dataclass
class FimTask:
    kind: str
    prefix: str
    middle: str
    suffix: str
    source: str


def docs_from_dir(root: str | Path) -> list[tuple[str, str]]:
    """(name, text) of readable UTF-8 files under root, hidden folders skipped, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        from codetune.config import ConfigError

        raise ConfigError(f"fim_source={str(root)!r}: not a directory; give a folder of held-out code files")
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            out.append((str(p.relative_to(root)), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def docs_from_val(data_dir: str | Path, tok, max_docs: int = 2000) -> list[tuple[str, str]]:
    """Documents of the prepared val split, decoded back to text. Skipped: documents that `prepare` rewrote
    into FIM order (their middle is already visible, so they would make the task trivial) and chat samples
    (prompt/response pairs, whose prompt tokens carry no loss: not code to fill in)."""
    from codetune.data.shards import PackedDataset

    ds = PackedDataset(data_dir, "val")
    special = {tok.convert_tokens_to_ids(t) for t in registry.tokens_in(tok).all()} - {tok.eos_token_id}
    out = []
    carry = False  # the previous sequence ended inside a chat sample, which this one's first part continues
    for i in range(len(ds)):
        ids = ds.tokens[i].tolist()
        n_real = int(ds.n_real[i])
        bounds = [int(s) for s in ds.doc_starts(i)] + [n_real]
        target = ds.target(i)
        pieces = list(zip(bounds[:-1], bounds[1:]))
        for j, (a, b) in enumerate(pieces):
            chat = target is not None and (not target[a:min(b, n_real)].all() or (j == 0 and carry))
            if j == len(pieces) - 1:
                carry = chat and n_real == ds.seq_len
            seg = [t for t in ids[a:min(b, n_real)] if t != tok.eos_token_id]
            if chat or not seg or special.intersection(seg):
                continue
            out.append((f"val[{i}].doc{j}", tok.decode(seg)))
            if len(out) >= max_docs:
                return out
    return out


def make_tasks(docs: list[tuple[str, str]], per_kind: int, seed: int = 0, max_rounds: int = 8,
               context_chars: int = CONTEXT_CHARS) -> list[FimTask]:
    """Deterministic tasks: per kind, walk the shuffled documents masking one line / 2-6 lines in each;
    with few documents, walk them again (up to max_rounds) at other places, never the same one twice."""
    rng = random.Random(seed)
    docs = [(n, t) for n, t in docs if len(t.splitlines()) >= MIN_LINES]
    tasks: list[FimTask] = []
    for kind in KINDS:
        order = list(range(len(docs)))
        rng.shuffle(order)
        seen: set[tuple[int, int]] = set()
        for _ in range(max_rounds):
            for d in order:
                if len(seen) >= per_kind:
                    break
                task = _mask(docs[d], kind, rng, context_chars)
                if task is not None and (d, task[0]) not in seen:
                    seen.add((d, task[0]))
                    tasks.append(task[1])
    return tasks


def _mask(doc: tuple[str, str], kind: str, rng: random.Random, context_chars: int = CONTEXT_CHARS
          ) -> tuple[int, FimTask] | None:
    """(first masked line, task) for one random place in the document, or None if it has none."""
    name, text = doc
    lines = text.splitlines(keepends=True)
    cands = [i for i, ln in enumerate(lines) if len(ln.strip()) >= 4]  # something to predict
    if not cands:
        return None
    start = rng.choice(cands)
    span = 1 if kind == "single_line" else min(rng.randint(2, 6), len(lines) - start)
    if kind == "multi_line" and span < 2:
        return None
    prefix = "".join(lines[:start])[-context_chars:]
    middle = "".join(lines[start:start + span])
    suffix = "".join(lines[start + span:])[:context_chars]
    if kind == "single_line":  # the middle is the line's text; its newline belongs to the suffix
        body = middle.rstrip("\r\n")
        middle, suffix = body, middle[len(body):] + suffix
    return start, FimTask(kind, prefix, middle, suffix, name)


def prompt(task: FimTask, tokens: SpecialTokens | None = None) -> str:
    """PSM order with the model family's FIM tokens (`tokens`; stable-code's if None): the model writes the
    middle after <fim_middle> and ends with EOS."""
    pre, suf, mid = (tokens or registry.default_tokens()).fim()
    return f"{pre}{task.prefix}{suf}{task.suffix}{mid}"


def normalize(text: str) -> str:
    """Compare code, not trailing whitespace: strip each line's end and blank lines at both ends."""
    return "\n".join(ln.rstrip() for ln in text.strip("\n").splitlines()).strip("\n")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over characters (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(a: str, b: str) -> float:
    if not a and not b:
        return 1.0
    return 1.0 - edit_distance(a, b) / max(len(a), len(b))


def score_one(task: FimTask, generated: str) -> dict:
    pred = generated.split("\n", 1)[0] if task.kind == "single_line" else generated
    p, t = normalize(pred), normalize(task.middle)
    return {"exact": p == t, "edit_similarity": edit_similarity(p, t), "prediction": pred}


def loss_queries(tasks: list[FimTask], tokens: SpecialTokens | None = None) -> list[fim_loss.Query]:
    """Per task, the two prompts its middle's loss is taken after: the generation's, and the same with the
    suffix empty (the control: what the prefix alone predicts)."""
    return [fim_loss.Query(prompt(t, tokens), prompt(dataclasses.replace(t, suffix=""), tokens), t.middle)
            for t in tasks]


def _middle_losses(model, tok, tasks: list[FimTask], tokens, batch_size: int) -> tuple[list[fim_loss.MiddleLoss], dict]:
    start = time.perf_counter()
    losses = fim_loss.middle_losses(model, tok, loss_queries(tasks, tokens), batch_size)
    return losses, fim_loss.summarise(losses, time.perf_counter() - start)


def evaluate(model, tok, tasks: list[FimTask], ecfg, out_dir: Path, log=print) -> dict:
    """Run both kinds; writes fim.jsonl (one row per task) and returns per-kind means."""
    if not tasks:
        raise ValueError("no FIM tasks could be built: the held-out documents are missing or too short "
                         f"(need >= {MIN_LINES} lines); give --fim-source DIR or prepare more validation data")
    rows, out = [], {}
    tokens = registry.tokens_in(tok)
    for kind in KINDS:
        ktasks = [t for t in tasks if t.kind == kind]
        if not ktasks:
            continue
        budget = min(ecfg.max_new_tokens, 64 if kind == "single_line" else 256)
        stop = ("\n",) if kind == "single_line" else ()
        stats = GenStats()
        log(f"fim {kind}: {len(ktasks)} tasks")
        gens = generate(model, tok, [prompt(t, tokens) for t in ktasks],
                        GenSettings(max_new_tokens=budget, stop=stop, batch_size=ecfg.gen_batch_size,
                                    decode=ecfg.eval_decode), stats)
        scores = [score_one(t, g) for t, g in zip(ktasks, gens)]
        losses, loss_summary = _middle_losses(model, tok, ktasks, tokens, ecfg.gen_batch_size)
        rows += [{**asdict(t), **s, **m.as_row()} for t, s, m in zip(ktasks, scores, losses)]
        out[kind] = {"tasks": len(ktasks), "exact_match": sum(s["exact"] for s in scores) / len(ktasks),
                     "edit_similarity": sum(s["edit_similarity"] for s in scores) / len(ktasks),
                     "generation": stats.as_dict(), **loss_summary}
        gain = loss_summary["middle_loss_intervals"]["suffix_gain"]
        log(f"fim {kind}: exact={out[kind]['exact_match']:.3f} edit_sim={out[kind]['edit_similarity']:.3f} "
            f"middle_loss={loss_summary['middle_loss']:.3f} suffix_gain={loss_summary['suffix_gain']:+.3f} "
            f"[{gain['low']:+.3f}, {gain['high']:+.3f}] ({loss_summary['middle_loss_cost']['seconds']:.1f} s)")
    write_jsonl(out_dir / ITEMS_FILE, rows)
    return out
