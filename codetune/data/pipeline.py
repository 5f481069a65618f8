"""The streaming pipeline: stages 1-4 (plus the per-document halves of 5 and 6) and stage 9's
tokenization run in worker processes; the parent keeps only what must be global — the dedup index,
the counts, and each kept document's split keys (the split itself is decided after the pass, see
split.py, while the tokens wait in prepare's staging file).

Work goes out in small batches with a bounded number in flight, so memory stays flat however large
the input, and results are consumed strictly in submission order, so the output does not depend on
timing or on the number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import multiprocessing as mp
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from codetune.data import chat, dedup, filters, fim, languages, redact
from codetune.data import decode as dec
from codetune.data.decontam import Decontaminator
from codetune.data.sources import Drop, Item
from codetune.data.split import UnitKeys, unit_keys
from codetune.data.stats import Stats
from codetune.data.tokenize import PieceEncoder, compact
from codetune.model.arch import SpecialTokens

WORKER_STAGES = ("decode", "language", "quality", "redact")  # those that can drop inside a worker
BATCH_FILES = 32
TOKEN_BATCH_BYTES = 2_000_000


@dataclass
class Setup:
    """Everything a worker needs, sent once per process."""
    thresholds: filters.Thresholds
    allowed: frozenset
    redact: bool
    near_dedup: bool
    num_perm: int
    shingle_size: int
    decontam: Decontaminator | None
    tokenizer_json: str
    special_ids: dict
    fast_tokenizer: bool  # the parent checked that fastbpe gives the tokenizer's exact ids
    fim_rate: float
    fim_spm_rate: float
    seed: int
    group_near: bool = False  # near dedup off but a split to make: still hash, to keep near copies together
    bands: tuple = ()  # (bands, rows) of the LSH index, set by run(): band keys are made in the workers
    chat_template: chat.Template | None = None  # how prompt/response rows are rendered
    fim_tokens: SpecialTokens | None = None  # the model family's FIM tokens (model/arch/); None: stable-code's
    seq_len: int = 0  # packed row length: documents longer than a row are cut before FIM (fim.row_chunks); 0: never
    eos_id: int | None = None  # ends each FIM sample but a document's last (the packer adds that one)


_W: dict = {}  # per-process state: the setup, permutations and encoder


def _init(setup: Setup) -> None:
    _W["setup"] = setup
    _W["perms"] = dedup.permutations(setup.num_perm)
    _W["enc"] = PieceEncoder(setup.tokenizer_json, setup.special_ids, setup.fast_tokenizer)


class _Clock:
    """Per-stage CPU time (not wall time: on a shared machine wall time measures the neighbours) and
    bytes inside a worker, summed into Stats by the parent."""

    def __init__(self):
        self.t = time.process_time()
        self.log: list[tuple[str, float, int]] = []

    def lap(self, stage: str, n_bytes: int) -> None:
        now = time.process_time()
        self.log.append((stage, now - self.t, n_bytes))
        self.t = now


def clean_one(item: Item | Drop, s: Setup, perms, clock: _Clock) -> dict:
    if isinstance(item, Drop):
        return {"drop": ("decode", item.reason), "path": item.path, "bytes": 0, "raw": b"", "kind": item.kind}
    if item.messages is not None:
        return clean_chat(item, s, perms, clock)
    if item.file is not None:
        data, reason = dec.read_file(item.file, s.thresholds.max_bytes)
    else:
        data, reason = item.text, None
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else (data or b"")
    base = {"path": item.path, "bytes": len(raw), "raw": hashlib.blake2b(raw, digest_size=16).digest(), "kind": "code"}
    text = None
    if reason is None:
        text, reason = dec.decode(data)
    clock.lap("decode", len(raw))
    if reason:
        return {**base, "drop": ("decode", reason)}

    lang = languages.detect(item.path) if item.path else "unknown"
    if lang is None or (item.path and lang not in s.allowed):
        return {**base, "drop": ("language", "unknown_language" if lang is None else f"not_allowed:{lang}")}
    if lang == "jupyter":
        text = dec.notebook_to_script(text)
        if text is None:
            return {**base, "drop": ("language", "bad_notebook")}
    clock.lap("language", len(raw))

    lines = text.splitlines()  # shared with decontamination when redaction leaves the text as it is
    reason = filters.quality_reason(text, lang, s.thresholds, lines)
    clock.lap("quality", len(raw))
    if reason:
        return {**base, "drop": ("quality", reason)}

    found: Counter = Counter()
    if s.redact:
        text, found = redact.redact(text)
    clock.lap("redact", len(raw))

    key = dedup.exact_key(text)
    bands = dedup.band_keys(dedup.signature(dedup.shingles(text, s.shingle_size), perms), *s.bands) \
        if s.near_dedup or s.group_near else None
    clock.lap("dedup", len(raw))
    contam = s.decontam.match(text, None if found else lines) if s.decontam else None
    clock.lap("decontam", len(raw))
    return {**base, "text": text, "lang": lang, "repo": item.repo, "source": item.source, "key": key,
            "bands": bands, "contam": contam, "redactions": found}


def clean_chat(item: Item, s: Setup, perms, clock: _Clock) -> dict:
    """A prompt/response pair through the same stages as code, except the code-quality rules (line
    lengths, alphanumeric share, ...), which measure source files, not prose: only the size bounds."""
    msgs = item.messages
    raw = chat.canonical_text(msgs).encode("utf-8", "surrogatepass")
    base = {"path": item.path, "bytes": len(raw), "raw": hashlib.blake2b(raw, digest_size=16).digest(), "kind": "chat"}
    clock.lap("decode", len(raw))
    reason = "too_small" if len(raw) < s.thresholds.min_bytes else "too_large" if len(raw) > s.thresholds.max_bytes \
        else None
    clock.lap("quality", len(raw))
    if reason:
        return {**base, "drop": ("quality", reason)}
    found: Counter = Counter()
    if s.redact:
        cleaned = []
        for m in msgs:
            text, f = redact.redact(m.content)
            found.update(f)
            cleaned.append(chat.Message(m.role, text))
        msgs = tuple(cleaned)
    clock.lap("redact", len(raw))
    try:
        pieces = chat.render(msgs, s.chat_template)
    except Exception:  # noqa: BLE001 - a template may refuse one conversation's roles: count it, go on
        return {**base, "drop": ("decode", "chat_template_failed")}
    text = chat.canonical_text(msgs)
    key = dedup.exact_key(text)
    bands = dedup.band_keys(dedup.signature(dedup.shingles(text, s.shingle_size), perms), *s.bands) \
        if s.near_dedup or s.group_near else None
    clock.lap("dedup", len(raw))
    contam = s.decontam.match(text) if s.decontam else None
    clock.lap("decontam", len(raw))
    return {**base, "text": text, "pieces": pieces, "lang": "chat", "repo": item.repo, "source": item.source,
            "key": key, "bands": bands, "contam": contam, "redactions": found}


def clean_batch(batch: list) -> tuple[list[dict], list]:
    s, clock = _W["setup"], _Clock()
    return [_guarded(it, s, clock) for it in batch], clock.log


def _guarded(item, s: Setup, clock: _Clock) -> dict:
    """An input that trips an unexpected error is counted under it; it never stops the run."""
    try:
        return clean_one(item, s, _W["perms"], clock)
    except Exception as e:  # noqa: BLE001 - by design: one bad file must not end a long run
        return {"drop": ("error", type(e).__name__), "path": getattr(item, "path", None), "bytes": 0, "raw": b"",
                "kind": getattr(item, "kind", "code")}


@dataclass(frozen=True)
class Tokens:
    ids: np.ndarray
    modes: tuple[str, ...]  # code: the FIM mode ("none", "psm", "spm") of each chunk (fim.row_chunks); chat: ("chat",)
    target: np.ndarray | None  # chat: bool per token, whether it carries loss


def fim_samples(body: str, key: str, s: Setup, enc) -> tuple[list[fim.FimPieces], tuple[str, ...]]:
    """A code document as the pieces to encode, in order, and the FIM mode of each of its chunks: a document
    longer than a row is cut into chunks that fit one, each rewritten on its own (fim.py says why); chunks
    left plain run on as one piece, so plain text is encoded as it reads."""
    budget = fim.sample_budget(s.seq_len) if s.fim_rate > 0 and s.seq_len else 0
    chunks = fim.row_chunks(body, budget, lambda texts: [len(a) for a in enc.texts(texts)])
    keys = [key] if len(chunks) == 1 else [f"{key}/{j}" for j in range(len(chunks))]
    out, modes = [], []
    for chunk, k in zip(chunks, keys):
        p = fim.fim_split(chunk, k, s.fim_rate, s.fim_spm_rate, s.seed, s.fim_tokens)
        modes.append(p.mode)
        if p.mode == "none" and out and out[-1].mode == "none":
            out[-1] = fim.FimPieces("none", ((None, out[-1].parts[0][1] + chunk),))
        else:
            out.append(p)
    return out, tuple(modes)


def encode_batch(docs: list[tuple[str | list, bytes]]) -> tuple[list[Tokens], list]:
    """Code (text) is FIM-rewritten at the run's rate; chat (rendered pieces) never is: a pair's order
    is the point of it, and FIM would scatter its loss mask. A FIM sample inside a document ends with EOS
    (its middle is complete there), so the packer can find each sample: from its first FIM token to that EOS."""
    s, clock, enc = _W["setup"], _Clock(), _W["enc"]
    code = [(i, *fim_samples(body, key.hex(), s, enc)) for i, (body, key) in enumerate(docs) if isinstance(body, str)]
    n_bytes = sum(len(b) if isinstance(b, str) else sum(len(p.text) for p in b) for b, _ in docs)
    clock.lap("fim", n_bytes)
    out: list = [None] * len(docs)
    encoded = iter(enc.encode([p for _, pieces, _ in code for p in pieces]))
    eos = np.asarray([s.eos_id if s.eos_id is not None else 0], dtype=np.uint32)
    for i, pieces, modes in code:
        parts = []
        for j, p in enumerate(pieces):
            parts.append(next(encoded))
            if p.mode != "none" and j < len(pieces) - 1:
                assert s.eos_id is not None, "a document cut into FIM samples needs Setup.eos_id"
                parts.append(eos)
        out[i] = Tokens(compact(parts[0] if len(parts) == 1 else np.concatenate(parts)), modes, None)
    for i, (body, _) in enumerate(docs):
        if not isinstance(body, str):
            e = chat.encode(body, enc)
            out[i] = Tokens(compact(e.ids), ("chat",), e.target)
    clock.lap("tokenize", n_bytes)
    return out, clock.log


class _Inline:
    """Same interface as a Pool's async results, run in this process (workers=1, tests)."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def batched(it: Iterable, n: int):
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


@dataclass(frozen=True)
class Kept:
    """What the split needs to know of a kept document."""
    units: UnitKeys
    doc_id: int  # its number in the dedup index, which names its near-duplicate group


@dataclass(frozen=True)
class Outcome:
    digest: bytes  # content hash of the inputs
    group: Callable[[int], int] | None  # doc_id -> its near-duplicate group; None when every group is one document


def run(items: Iterable, setup: Setup, workers: int, dedup_threshold: float,
        sink: Callable[[Kept, Tokens], None], stats: Stats, tick: Callable[[str, int, int], None] | None = None
        ) -> Outcome:
    """Drive all stages over `items`; `sink(kept, tokens)` receives each kept document's tokens in input
    order (the split is decided afterwards, when all units are known)."""
    dd = dedup.Deduper(dedup_threshold, setup.num_perm, drop_near=setup.near_dedup)
    setup = dataclasses.replace(setup, bands=(dd.b, dd.r))
    pool = mp.get_context("fork").Pool(workers, initializer=_init, initargs=(setup,)) if workers > 1 else None
    if pool is None:
        _init(setup)

    def submit(fn, arg):
        return pool.apply_async(fn, (arg,)) if pool else _Inline(fn(arg))

    content = hashlib.sha256()
    cleaning, encoding = deque(), deque()
    pending: list[tuple[str | list, bytes, Kept, int]] = []  # text (code) or pieces (chat), key, kept, bytes
    pending_bytes = 0
    depth = max(2, 2 * workers)
    source = batched(items, BATCH_FILES)
    doc_id = 0

    def flush_tokens():
        nonlocal pending, pending_bytes
        if pending:
            meta = [(p[2], p[3]) for p in pending]
            encoding.append((meta, submit(encode_batch, [(p[0], p[1]) for p in pending])))
            pending, pending_bytes = [], 0

    def drain(limit: int):
        while len(encoding) > limit:
            meta, res = encoding.popleft()
            out, log = res.get()
            for stage, sec, nb in log:
                stats.add_timing(stage, sec, nb)
            for (kept, nb), t in zip(meta, out):
                if t.target is None:
                    stats.fim_modes.update(t.modes)
                kind = stats.kinds["code" if t.target is None else "chat"]
                kind["kept"] += 1
                kind["tokens"] += len(t.ids)
                kind["loss_tokens"] += len(t.ids) + 1 if t.target is None else int(t.target.sum())
                stats.kept["fim"] += 1
                stats.kept["tokenize"] += 1
                stats.doc_tokens.append(len(t.ids))
                sink(kept, t)
                if tick:
                    tick("tokenize", 1, nb)

    try:
        for batch in itertools.islice(source, depth):
            cleaning.append(submit(clean_batch, batch))
        while cleaning:
            results, log = cleaning.popleft().get()
            nxt = next(source, None)
            if nxt is not None:
                cleaning.append(submit(clean_batch, nxt))
            for stage, sec, nb in log:
                stats.add_timing(stage, sec, nb)
            for r in results:
                stats.files_seen += 1
                stats.kinds[r["kind"]]["seen"] += 1
                stats.input_bytes += r["bytes"]
                content.update(r["raw"])
                if tick:
                    tick("clean", 1, r["bytes"])
                passed = WORKER_STAGES.index(r["drop"][0]) if "drop" in r and r["drop"][0] in WORKER_STAGES \
                    else (0 if "drop" in r else len(WORKER_STAGES))
                for stage in WORKER_STAGES[:passed]:  # the stages before the one that dropped it
                    stats.kept[stage] += 1
                if "drop" in r:
                    stats.drop(*r["drop"], r["bytes"], kind=r["kind"])
                    continue
                stats.redactions.update(r["redactions"])
                why = dd.check(doc_id, r["key"], r["bands"])
                doc_id += 1
                if why:
                    stats.drop("dedup", why, r["bytes"], kind=r["kind"])
                    continue
                stats.kept["dedup"] += 1
                if r["contam"]:
                    stats.drop("decontam", "benchmark_match", r["bytes"], kind=r["kind"])
                    stats.contaminated.append({"path": r["path"], "match": r["contam"]})
                    continue
                stats.kept["decontam"] += 1
                kept = Kept(unit_keys(r["source"], r["repo"], r["path"], r["key"]), doc_id - 1)
                stats.kept["split"] += 1
                stats.languages[r["lang"]] += 1
                stats.language_bytes[r["lang"]] += r["bytes"]
                stats.file_bytes.append(r["bytes"])
                pending.append((r.get("pieces", r["text"]), r["key"], kept, r["bytes"]))
                pending_bytes += len(r["text"])
                if pending_bytes >= TOKEN_BATCH_BYTES:
                    flush_tokens()
                    drain(depth)
        flush_tokens()
        drain(0)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    stats.lsh_bands = (dd.b, dd.r)
    stats.dedup_index_bytes = dd.memory_bytes()
    stats.dedup_indexed = len(dd.exact)
    return Outcome(content.digest(), dd.group if dd.parent else None)
