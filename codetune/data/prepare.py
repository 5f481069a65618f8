"""`codetune prepare`: turn the user's code into packed token shards for training.

Order of work: every configuration check first (sources, columns, languages, benchmark files, the
data dir, tokenizer and its FIM tokens), then the run key. If `data_dir` already holds a finished run
with the same key (same configuration, tokenizer and input files), it is reused as is. Otherwise the
pipeline streams into a temporary folder beside `data_dir` that replaces it only when everything,
manifest included, is written and at least one document was kept: a failure leaves the old set (or
nothing), never a half-written or empty folder that looks finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from codetune import registry
from codetune.atomic import replace_dir, temp_beside, write_text
from codetune.config import ConfigError, DataConfig, ModelConfig
from codetune.data import fastbpe, filters, languages, pipeline, split
from codetune.data.chat import canonical_text, check_template, template_of
from codetune.data.decontam import Decontaminator
from codetune.data.fim import check_fim_tokens
from codetune.data.mix import pack_splits
from codetune.data.outdir import check_data_dir, clean_stale, local_inputs, write_error
from codetune.data.shards import Packer, ShardWriter, Staging
from codetune.data.sources import Columns, Item, check_sources, iter_source, kind_of, resolve
from codetune.data.stats import Stats
from codetune.model.arch import SpecialTokens
from codetune.model.tokenizer import cache_root, load_tokenizer, tokenizer_fingerprint

CLI_FLAGS = [
    (("--force",), {"action": "store_true",
                    "help": "replace a --data-dir that holds files prepare did not write (deleting them)"}),
    (("--json",), {"action": "store_true", "help": "print the closing summary as JSON (for scripts)"}),
]
PIPELINE_VERSION = 6  # bump when a change alters the shards, so old runs are not reused
BPE_SAMPLE_BYTES = 20_000_000
NOT_IN_KEY = ("data_dir", "workers", "write_report")  # settings that do not change the shards


def columns(data: DataConfig) -> Columns:
    return Columns(data.content_column, data.path_column, data.repo_column, data.license_column)


def iter_items(data: DataConfig) -> Iterator:
    items = itertools.chain.from_iterable(iter_source(s, resolve(s, columns(data), data.data_format))
                                          for s in data.sources)
    return itertools.islice(items, data.max_files) if data.max_files else items


def input_fingerprint(data: DataConfig) -> tuple[str, int | None]:
    """Cheap identity of the inputs (names, sizes, mtimes), for deciding whether a run can be reused,
    and the number of files (None when a tabular source makes it unknown until read). The manifest
    also records a true content hash, computed while the run reads the data."""
    h = hashlib.sha256()
    n_files: int | None = 0
    for src in data.sources:
        h.update(src.encode())
        p = Path(src).expanduser()
        if kind_of(src) != "path" or not p.is_dir():
            n_files = None
            if kind_of(src) == "hf":
                continue  # a hub dataset's revision is not visible offline; its name stands for it
        paths = [Path(it.file) for it in iter_items(dataclasses.replace(data, sources=[src]))
                 if isinstance(it, Item) and it.file] if p.is_dir() else [p]
        if n_files is not None:
            n_files += len(paths)
        for f in paths:
            try:
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{f}:missing".encode())
    if n_files is not None and data.max_files:
        n_files = min(n_files, data.max_files)
    return h.hexdigest(), n_files


def corpus_for_bpe(data: DataConfig, allowed: frozenset) -> list[Path]:
    """Files to train the tiny model's BPE on: the allowed-language files of local trees, plus a sample
    of record sources' texts written to a file named by the sources, so the cached BPE is reused."""
    files, records = [], []
    for it in iter_items(data):
        if not isinstance(it, Item):
            continue
        if it.file and languages.detect(it.path) in allowed:
            files.append(Path(it.file))
        elif it.messages is not None and sum(map(len, records)) < BPE_SAMPLE_BYTES:
            records.append(canonical_text(it.messages))
        elif it.text is not None and sum(map(len, records)) < BPE_SAMPLE_BYTES:
            records.append(it.text if isinstance(it.text, str) else it.text.decode("utf-8", "replace"))
    if records:
        name = hashlib.sha256("\n".join(data.sources).encode()).hexdigest()[:16]
        sample = cache_root() / "bpe-samples" / f"{name}.txt"
        sample.parent.mkdir(parents=True, exist_ok=True)
        write_text(sample, "\n".join(records), encoding="utf-8", errors="replace")
        files.append(sample)
    return files


def run_key(data: DataConfig, tok_fp: str, inputs: str) -> str:
    cfg = {k: v for k, v in dataclasses.asdict(data).items() if k not in NOT_IN_KEY}
    blob = json.dumps({"v": PIPELINE_VERSION, "cfg": cfg, "tok": tok_fp, "in": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def reusable(out: Path, key: str) -> dict | None:
    try:
        m = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    complete = all((out / s / "meta.json").exists() for s in m.get("splits", {})) and (out / "tokenizer").exists()
    return m if m.get("run_key") == key and complete else None


def check_config(data: DataConfig, force: bool = False) -> tuple[frozenset, Decontaminator | None]:
    data.validate()
    check_sources(data.sources, columns(data), data.data_format)
    unknown = languages.check_languages(data.languages)
    if unknown:
        raise ConfigError(f"languages: unknown {unknown}; known: {', '.join(languages.KNOWN)}")
    decon = Decontaminator.build(data.decontaminate, data.decontam_files) \
        if (data.decontaminate or data.decontam_files) else None
    check_data_dir(Path(data.data_dir).expanduser(), local_inputs(data.sources, data.decontam_files), force)
    return languages.allowed_languages(data.languages), decon


def prepare(data: DataConfig, model: ModelConfig, progress=None, force: bool = False) -> dict:
    """Run the pipeline; returns the manifest. `progress` is True for terminal bars, or a callable
    `(files_done, total)` (total is None when a JSONL / Parquet / HF source makes it unknown). `force`
    allows replacing a data dir that holds files prepare did not write."""
    t0 = time.time()
    allowed, decon = check_config(data, force)
    out = Path(data.data_dir).expanduser().resolve()  # resolved: "." has no name to put a temp folder beside
    clean_stale(out, (cache_root() / "bpe-samples",))
    corpus = corpus_for_bpe(data, allowed) if model.tokenizer is None and model.random_init else None
    tok = load_tokenizer(model, corpus_files=corpus)
    tokens = registry.special_tokens(model.model)  # (the model family's FIM tokens: model/arch/)
    check_fim_tokens(tok, data.fim_rate, tokens)
    template = template_of(tok, data.chat_template)
    if template.jinja and any(resolve(s, columns(data), data.data_format).format != "code" for s in data.sources):
        check_template(template)
    inputs, n_files = input_fingerprint(data)
    key = run_key(data, tokenizer_fingerprint(tok), inputs)
    if (old := reusable(out, key)) is not None:
        return {**old, "reused": True}
    tmp = temp_beside(out)
    try:
        return _build(data, tok, key, allowed, decon, tmp, out, progress, n_files, t0, template, tokens)
    except OSError as e:
        err = write_error(e, out, tmp)
        if err is None:
            raise
        raise err from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a success (swapped in)


def _build(data, tok, key, allowed, decon, tmp: Path, out: Path, progress, n_files, t0, template,
           tokens: SpecialTokens) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok_json = tok.backend_tokenizer.to_str()
    fast, encoder = fastbpe.build(tok_json)  # same ids either way; tiktoken only where checked faithful
    fim_ids = _fim_ids(tok, tokens)
    setup = pipeline.Setup(
        thresholds=filters.Thresholds(data.min_file_bytes, data.max_file_bytes, data.max_line_length,
                                      data.max_mean_line_length, data.min_alnum_fraction),
        allowed=allowed, redact=data.redact_secrets, near_dedup=data.near_dedup, num_perm=data.minhash_perms,
        shingle_size=data.shingle_size, decontam=decon, tokenizer_json=tok_json,
        special_ids=fim_ids, fim_tokens=tokens, fast_tokenizer=fast is not None, fim_rate=data.fim_rate,
        fim_spm_rate=data.fim_spm_rate, seed=data.data_seed, group_near=data.val_fraction > 0,
        chat_template=template, seq_len=data.seq_len, eos_id=tok.eos_token_id)
    stats = Stats()
    workers = data.workers or os.cpu_count() or 1
    staging = Staging(tmp / "staging.bin", len(tok))
    writers: dict[str, ShardWriter] = {}
    try:
        with _ticker(progress, n_files) as tick:
            outcome = pipeline.run(iter_items(data), setup, workers, data.dedup_threshold,
                                   lambda kept, t: staging.add(kept.units.values(), kept.doc_id, t.ids, t.target),
                                   stats, tick)
        if not len(staging):
            raise ConfigError(nothing_kept(stats, out))
        groups = np.array([outcome.group(d) for d in staging.groups], dtype=np.int64) if outcome.group else None
        weights = np.frombuffer(staging.lengths, dtype=np.uint32).astype(np.int64) + 1  # + EOS
        plan = split.plan(staging.unit_keys(), weights, groups, data.val_fraction)
        writers = {s: ShardWriter(tmp / s, data.seq_len, len(tok)) for s in ("train", "val")}
        fim_start = fim_ids[tokens.fim()[0]] if data.fim_rate > 0 else None  # where a FIM sample begins
        packers = {s: Packer(w, tok.eos_token_id, tok.pad_token_id, fim_start) for s, w in writers.items()}
        mixed = pack_splits(staging, plan.val, packers, data.mix)
        staging.close()
        n_val = int(plan.val.sum())
        stats.split_documents.update({"train": len(plan.val) - n_val, "val": n_val})
        metas = {s: p.finish() for s, p in packers.items()}
        tok.save_pretrained(tmp / "tokenizer")
        manifest = _manifest(data, tok, key, stats, metas, outcome.digest.hex(), time.time() - t0)
        manifest["tokenizer_info"]["encoder"] = encoder  # which path made the ids (both give the same)
        manifest["split"] = plan.to_manifest()
        manifest["mix"] = mixed
        manifest["chat_template"] = "tokenizer" if template.jinja else "plain"
        if data.write_report:
            from codetune.data.report import write_report

            manifest["report_files"] = write_report(tmp, manifest, stats)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        replace_dir(tmp, out)
    except BaseException:
        for w in writers.values():  # none of these raises: the original error is the one to see
            if w.tmp.exists():
                w.abort()
        staging.close()
        raise
    return manifest


STAGE_HINTS = {"decode": "replace the broken, empty or binary inputs", "language": "allow their languages with "
               "--languages", "quality": "loosen the quality filter that dropped them (--min-file-bytes, "
               "--max-line-length, ...)", "dedup": "add inputs that are not copies", "decontam": "add inputs that "
               "hold no benchmark code", "error": "report the error named above as a bug"}


def nothing_kept(stats: Stats, out: Path) -> str:
    """Why a run kept no document, on one line: the top reasons and the fix for the biggest one."""
    reasons = sorted(((n, st, r) for st, rs in stats.dropped.items() for r, n in rs.items()), reverse=True)
    if not stats.files_seen or not reasons:
        what, fix = "the sources hold no files or records", "check the --sources paths (an empty folder or JSONL?)"
    else:
        shown = ", ".join(f"{st} {r}: {n:,}" for n, st, r in reasons[:4]) + (", ..." if len(reasons) > 4 else "")
        what, fix = f"all {stats.files_seen:,} inputs were dropped ({shown})", STAGE_HINTS.get(reasons[0][1], "")
    kept = f"; {out} was left as it was" if out.exists() else ""
    return f"no documents kept: {what}{kept}. Fix: {fix} (docs/data.md lists every reason)"


def _fim_ids(tok, tokens: SpecialTokens) -> dict:
    return {t: tok.convert_tokens_to_ids(t) for t in tokens.fim()}


def _manifest(data, tok, key, stats: Stats, metas: dict, digest: str, seconds: float) -> dict:
    counts = stats.to_dict()
    n_dropped = sum(sum(s["dropped"].values()) for s in counts["stages"].values())
    counts.update(kept=stats.kept["tokenize"], dropped=n_dropped)
    return {
        "format": PIPELINE_VERSION, "run_key": key, "sources": list(data.sources),
        "config": dataclasses.asdict(data), "tokenizer": tokenizer_fingerprint(tok),
        "tokenizer_info": {"class": type(tok).__name__, "vocab_size": len(tok), "eos_id": tok.eos_token_id},
        "input_sha256": digest, "counts": counts, "splits": metas,
        "near_dedup": {"bands": stats.lsh_bands[0] if stats.lsh_bands else None,
                       "rows": stats.lsh_bands[1] if stats.lsh_bands else None,
                       "threshold": data.dedup_threshold, "perms": data.minhash_perms,
                       "documents_indexed": stats.dedup_indexed, "index_bytes": stats.dedup_index_bytes},
        "seconds": round(seconds, 2),
        "input_mb_per_s": round(stats.input_bytes / 1e6 / max(seconds, 1e-9), 2),
    }


class _ticker:
    """Adapts the `progress` argument to pipeline ticks."""

    def __init__(self, progress, total: int | None):
        self.progress, self.total, self.bars, self.done = progress, total, None, 0

    def __enter__(self):
        if self.progress is True:
            from codetune.data.progress import Bars

            self.bars = Bars(None).__enter__()
            return self.bars.tick
        if callable(self.progress):
            return self._call
        return None

    def _call(self, phase: str, files: int, n_bytes: int) -> None:
        if phase == "clean":
            self.done += files
            self.progress(self.done, self.total)

    def __exit__(self, *exc):
        if self.bars:
            self.bars.__exit__(*exc)


def written_files(m: dict, out: Path) -> list[str]:
    """What a prepared set holds, as paths (folders end with /), for the closing summary."""
    report = m.get("report_files")
    if report is None:  # a set from before the manifest listed them
        from codetune.data.report import REPORT_FILES

        report = [f for f in REPORT_FILES if (out / f).exists()]
    return [str(out / "manifest.json")] + [str(out / f) for f in report] + \
        [str(out / d) + "/" for d in (*m["splits"], "tokenizer")]


def summary(m: dict, out: Path) -> dict:
    c = m["counts"]
    return {"reused": m.get("reused", False), "files_seen": c["files_seen"], "kept": c["kept"],
            "dropped": {s: v["dropped"] for s, v in c["stages"].items() if v["dropped"]},
            "splits": {s: {"sequences": v["n_seq"], "tokens": v["n_tokens"]} for s, v in m["splits"].items()},
            "split": m.get("split"), "seconds": m["seconds"], "data_dir": str(out), "files": written_files(m, out)}


def summary_text(m: dict, out: Path) -> str:
    from codetune.data.report import split_sentence

    c = m["counts"]
    dropped = {s: sum(v["dropped"].values()) for s, v in c["stages"].items() if v["dropped"]}
    lines = [f"{'reused' if m.get('reused') else 'prepared'} {out}: kept {c['kept']:,} of {c['files_seen']:,} inputs"
             + (f" (dropped: {', '.join(f'{s} {n:,}' for s, n in dropped.items())})" if dropped else ""),
             "  " + ", ".join(f"{s} {v['n_seq']:,} sequences / {v['n_tokens']:,} tokens" for s, v in m["splits"].items())]
    if m.get("split"):
        lines.append("  " + split_sentence(m["split"]))
    files = written_files(m, out)
    report = [f for f in files if f.endswith("report.md")]
    lines.append(f"  {'report: ' + report[0] + ' · ' if report else ''}all files: "
                 + ", ".join(Path(f).name + ("/" if f.endswith("/") else "") for f in files))
    return "\n".join(lines)


def run(cfgs: dict, ns) -> int:
    import sys

    out = Path(cfgs["data"].data_dir).expanduser().resolve()
    m = prepare(cfgs["data"], cfgs["model"], progress=sys.stderr.isatty(), force=getattr(ns, "force", False))
    print(json.dumps(summary(m, out), indent=1) if getattr(ns, "json", False) else summary_text(m, out))
    return 0
