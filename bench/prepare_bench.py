"""Benchmark of `codetune prepare` (not a test): builds a corpus of at least --target-mb from the
installed Python packages' sources, copied with mutations so deduplication has real work, prepares it
with the GPT-NeoX tokenizer from ../shared on --workers processes, and writes
bench/results/prepare_<name>.{json,md}: input MB/s per stage and overall, peak RAM, dedup index size.

Mutations per extra copy: half are whitespace-only changes (exact duplicates after normalisation), half
are small edits (renamed identifiers, an inserted comment: near duplicates).

    python bench/prepare_bench.py --target-mb 500 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's codetune, installed or not
SHARED_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "gpt-neox-20b.json"


def mutate(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:  # whitespace only: an exact duplicate after normalisation
        return text.replace("\n", "\n\n", 3).replace("    ", "\t", 5)
    lines = text.splitlines()
    for _ in range(3):
        if lines:
            i = rng.randrange(len(lines))
            lines.insert(i, f"# patched by fork {rng.randint(0, 10**6)}")
    out = "\n".join(lines)
    return out.replace("self", "this", 2).replace("return", "return ", 1)


def build_corpus(dest: Path, target_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Repositories under dest: pkg.original/..., pkg.fork1/..., until target_bytes are written."""
    site = Path(sysconfig.get_paths()["purelib"])
    files = sorted(p for p in site.rglob("*.py") if p.is_file() and not p.is_symlink())
    rng = random.Random(seed)
    total = n = 0
    copy = 0
    while total < target_bytes:
        for f in files:
            if total >= target_bytes:
                break
            rel = f.relative_to(site)
            repo = rel.parts[0] if len(rel.parts) > 1 else "_top"
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if copy > 0:
                if rng.random() > 0.6:
                    continue
                text = mutate(text, rng)
            out = dest / f"{repo}.copy{copy}" / Path(*rel.parts[1:] or rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
            total += len(text.encode())
            n += 1
        copy += 1
    return total, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-mb", type=float, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--corpus", default="/tmp/codetune-bench-corpus")
    ap.add_argument("--name", default="500mb")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--reuse-corpus", action="store_true",
                    help="keep a corpus already built at --corpus for the same --target-mb (repeat runs)")
    args = ap.parse_args()
    if not SHARED_TOKENIZER.exists():
        print(f"needs the GPT-NeoX tokenizer at {SHARED_TOKENIZER}", file=sys.stderr)
        return 1
    os.environ.setdefault("CODETUNE_CACHE", "/tmp/codetune-bench-cache")
    from codetune.config import DataConfig, ModelConfig
    from codetune.data.prepare import prepare

    corpus = Path(args.corpus)
    marker = corpus.with_name(corpus.name + ".built.json")  # beside it: inside, it would be an input
    t = time.time()
    if args.reuse_corpus and corpus.is_dir() and marker.exists() and json.loads(marker.read_text())["target_mb"] == args.target_mb:
        n_bytes, n_files = json.loads(marker.read_text())["built"]
    else:
        shutil.rmtree(corpus, ignore_errors=True)
        n_bytes, n_files = build_corpus(corpus, int(args.target_mb * 1e6))
        marker.write_text(json.dumps({"target_mb": args.target_mb, "built": [n_bytes, n_files]}))
    build_s = time.time() - t
    print(f"corpus: {n_files} files, {n_bytes / 1e6:.1f} MB in {build_s:.0f}s", flush=True)

    out = Path("/tmp/codetune-bench-out")
    shutil.rmtree(out, ignore_errors=True)
    data = DataConfig(sources=[str(corpus)], data_dir=str(out), seq_len=args.seq_len, workers=args.workers)
    model = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(SHARED_TOKENIZER))
    load_before = round(os.getloadavg()[0], 2)  # the machine is shared: record how busy it was
    t = time.time()
    cpu0 = _cpu()
    man = prepare(data, model, progress=sys.stderr.isatty())
    wall = time.time() - t
    cpu = {k: round(v - cpu0[k], 1) for k, v in _cpu().items()}
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    c = man["counts"]
    result = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "workers": args.workers,
                    "load_avg_1m_after": round(os.getloadavg()[0], 2), "load_avg_1m_before": load_before},
        "corpus": {"files": n_files, "mb": round(n_bytes / 1e6, 1), "build_seconds": round(build_s, 1)},
        "wall_seconds": round(wall, 1),
        "input_mb": round(c["input_bytes"] / 1e6, 1),
        "overall_mb_per_s": round(c["input_bytes"] / 1e6 / wall, 2),
        "stage_mb_per_cpu_second": {s: v.get("mb_per_cpu_second") for s, v in c["stages"].items()},
        "stage_cpu_seconds": {s: v.get("cpu_seconds") for s, v in c["stages"].items()},
        # whole processes (user + system): the stages plus start-up, inter-process traffic, packing
        "process_cpu_seconds": cpu, "tokenizer_encoder": man["tokenizer_info"].get("encoder"),
        "peak_rss_mb": {"main": round(rss_self), "largest_worker": round(rss_children)},
        "near_dedup": man["near_dedup"],
        "kept": c["kept"], "dropped": {s: v["dropped"] for s, v in c["stages"].items() if v["dropped"]},
        "splits": {s: {"sequences": v["n_seq"], "tokens": v["n_tokens"]} for s, v in man["splits"].items()},
    }
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"prepare_{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (res_dir / f"prepare_{args.name}.md").write_text(render(result))
    print(json.dumps(result, indent=1))
    return 0


def _cpu() -> dict:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"main": me.ru_utime + me.ru_stime, "workers": kids.ru_utime + kids.ru_stime}


def render(r: dict) -> str:
    nd = r["near_dedup"]
    lines = [f"# prepare benchmark ({r['input_mb']} MB, {r['machine']['workers']} workers on "
             f"{r['machine']['cores']} cores)", "",
             f"Overall: **{r['overall_mb_per_s']} MB/s** input ({r['wall_seconds']} s wall for {r['input_mb']} MB, "
             f"{r['corpus']['files']} files). Peak RSS: main {r['peak_rss_mb']['main']} MB, largest worker "
             f"{r['peak_rss_mb']['largest_worker']} MB.", "",
             "| stage | CPU s (all workers) | MB per CPU-second |", "|---|---:|---:|"]
    for s, v in r["stage_mb_per_cpu_second"].items():
        lines.append(f"| {s} | {r['stage_cpu_seconds'][s]} | {v if v is not None else '-'} |")
    pc = r.get("process_cpu_seconds")
    if pc:
        lines += ["", f"Whole processes: workers {pc['workers']} CPU s, main {pc['main']} CPU s "
                  f"({(pc['workers'] + pc['main']) / r['wall_seconds']:.2f} cores busy on average); load average "
                  f"{r['machine']['load_avg_1m_before']} before, {r['machine']['load_avg_1m_after']} after. "
                  f"Tokenizer path: {r.get('tokenizer_encoder')}."]
    lines += ["", f"Dedup index: {nd['documents_indexed']} documents, {nd['bands']} bands x {nd['rows']} rows, "
              f"~{nd['index_bytes'] / 1e6:.1f} MB (~{nd['index_bytes'] / max(nd['documents_indexed'], 1):.0f} "
              "bytes per document, linear in the number of kept documents, independent of their size).", "",
              "Kept " + str(r["kept"]) + " documents; dropped: " + json.dumps(r["dropped"]), "",
              "Splits: " + json.dumps(r["splits"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
