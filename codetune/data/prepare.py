"""`codetune prepare` — FIRST PIPELINE (foundation): walk sources, keep text code files, split by
repository hash, FIM-rewrite, tokenize, pack, write shards + manifest. The data issue replaces the
body with the full staged pipeline; the public API (`prepare()`, `run()`) stays."""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from codetune.config import ConfigError, DataConfig, ModelConfig
from codetune.data.shards import Packer, ShardWriter, replace_dir
from codetune.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from codetune import registry

CODE_EXT = {".py", ".md", ".js", ".ts", ".c", ".h", ".cpp", ".java", ".go", ".rs", ".rb", ".php", ".sh"}


def list_files(sources: list[str], max_files: int | None = None) -> list[Path]:
    files: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if not p.exists():
            raise ConfigError(f"source {src!r} does not exist; give a directory or file of code")
        cands = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.suffix in CODE_EXT and x.is_file())
        files.extend(c for c in cands if ".git" not in c.parts and "site-packages" not in c.parts)
        if max_files and len(files) >= max_files:
            return files[:max_files]
    return files


def fim_transform(text: str, rng: random.Random, spm_rate: float) -> str:
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    pre, mid, suf = text[:a], text[a:b], text[b:]
    if rng.random() < spm_rate:
        return f"{registry.FIM_PREFIX}{registry.FIM_SUFFIX}{suf}{registry.FIM_MIDDLE}{pre}{mid}"
    return f"{registry.FIM_PREFIX}{pre}{registry.FIM_SUFFIX}{suf}{registry.FIM_MIDDLE}{mid}"


def is_val(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def prepare(data: DataConfig, model: ModelConfig, progress=None) -> dict:
    files = list_files(data.sources, data.max_files)
    tok = load_tokenizer(model, corpus_files=files)
    out = Path(data.data_dir)
    tmp = out.with_name(out.name + ".tmp")
    vocab = len(tok)
    writers = {s: ShardWriter(tmp / s, data.seq_len, vocab) for s in ("train", "val")}
    packers = {s: Packer(w, tok.eos_token_id, tok.pad_token_id) for s, w in writers.items()}
    rng = random.Random(0)
    kept = dropped = 0
    t0 = time.time()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            dropped += 1
            continue
        if not text.strip():
            dropped += 1
            continue
        split = "val" if is_val(str(f.parent), data.val_fraction) else "train"
        if rng.random() < data.fim_rate:
            text = fim_transform(text, rng, data.fim_spm_rate)
        packers[split].add_document(tok.encode(text, add_special_tokens=False))
        kept += 1
        if progress:
            progress(kept + dropped, len(files))
    metas = {s: p.finish() for s, p in packers.items()}
    save_dir = tmp / "tokenizer"
    tok.save_pretrained(save_dir)
    manifest = {"sources": data.sources, "config": data.__dict__, "tokenizer": tokenizer_fingerprint(tok),
                "counts": {"kept": kept, "dropped": dropped}, "splits": metas, "seconds": round(time.time() - t0, 2)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    replace_dir(tmp, out)
    return manifest


def run(cfgs: dict, ns) -> int:
    m = prepare(cfgs["data"], cfgs["model"])
    print(json.dumps({k: m[k] for k in ("counts", "splits")}, indent=1))
    return 0
