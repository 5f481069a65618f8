"""Turn one device call's results.jsonl + env.json (from bench/run_gpu.sh) into the committed record:
a JSON file and a Markdown table of codetune against both peers, as ratios from the same call.

Usage: python3 bench/report.py RESULTS_DIR [RESULTS_DIR ...] OUT_STEM [--replan]
(writes OUT_STEM.json and OUT_STEM.md; several RESULTS_DIRs of one session's calls make one record, their
suites and commits named). --replan puts the current planner's prediction beside each real run (the one
tests/plan/test_real_runs.py holds) in place of the one made at measurement time, and says so.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path


def load(results_dir: Path) -> tuple[dict, list[dict]]:
    env = json.loads((results_dir / "env.json").read_text().splitlines()[0])
    rows = []
    for ln in (results_dir / "results.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:  # a job that printed multi-line JSON: its one-line summary follows
            continue
    out = []
    for r in rows:
        res = r["result"]
        if res and "error" not in res:
            if "CODETUNE_NF4_DEQUANT=bitsandbytes" in r.get("job", ""):
                res = dict(res, dequant="bitsandbytes")
            ab = re.search(r"\.ab/(\w+)", r.get("job", ""))
            if ab:  # bench/suites/ab.txt: which of the two checkouts ran it
                res = dict(res, checkout=ab.group(1))
            out.append(res)
    return env, out


def key(r: dict) -> tuple:
    return (r.get("quant"), r.get("seq"), r.get("last_layers", 0) or 0)


def graphed(r: dict) -> bool:
    """Did this length run graphed? Records before 2026-11-28's session 4 carry only a per-process capture
    count, so auto is inferred from the limit of the day (4,096 tokens then)."""
    if "graphs_active" in r:
        return bool(r["graphs_active"])
    if r.get("cuda_graphs") == "on":
        return bool(r.get("graphs_captured"))
    return bool(r.get("graphs_captured")) and r["seq"] <= r.get("graphs_auto_max_tokens", 4096)


def table(results: list[dict]) -> list[str]:
    peers = {("unsloth", key(r)): r for r in results if r.get("peer") == "unsloth"}
    peers.update({("hf", key(r)): r for r in results if r.get("peer") == "hf-peft-bnb"})
    ours = [r for r in results if r.get("engine") == "codetune" and "tokens_per_s" in r]
    if not ours and not peers:
        return []
    out = ["| configuration | codetune tok/s | reserved GiB | (reserved − allocated) / allocated | vs Unsloth speed "
           "| vs Unsloth memory | vs HF speed | vs HF memory |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ours, key=lambda r: (r["quant"], r.get("last_layers", 0), r["seq"])):
        name = f"{r['quant']}, {r['seq'] // 1024}k" + (f", last {r['last_layers']} layers" if r.get("last_layers") else "")
        if r.get("fast_layers") is False:
            name += ", fused layers off"
        if r.get("dequant"):
            name += f", {r['dequant']} dequant"
        if r.get("checkout"):
            name += f" [checkout {r['checkout']}]"
        graphs = r.get("cuda_graphs")
        if graphs == "off":
            name += ", CUDA graphs off"
        elif graphs:
            name += ", CUDA-graphed" if graphed(r) else ", eager"
            if graphs == "on":
                name += " (--cuda-graphs on)"
        if r.get("offload") not in (None, "auto"):
            name += f", offload {r['offload']}"
        if r.get("max_vram"):
            name += f" (--max-vram {r['max_vram']})"
        slack = (r["peak_reserved_gib"] - r["peak_allocated_gib"]) / r["peak_allocated_gib"] if r.get("peak_allocated_gib") else None
        cells = [name, f"{r['tokens_per_s']:,.0f}", f"{r['peak_reserved_gib']:.2f}", "–" if slack is None else f"{slack:.1%}"]
        for peer in ("unsloth", "hf"):
            # last:N is compared with the peer's all-layer run (issue 5, target 2)
            p = peers.get((peer, (r["quant"], r["seq"], 0)))
            if p is None:
                cells += ["–", "–"]
            else:
                cells += [f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}×",
                          f"{r['peak_reserved_gib'] / p['peak_reserved_gib']:.2f}×"]
        out.append("| " + " | ".join(cells) + " |")
    if not peers:
        return out + [""]
    out += ["", "Peers in the same call:", "", "| peer | configuration | tok/s | reserved GiB |", "|---|---|---|---|"]
    for (peer, k), p in sorted(peers.items(), key=lambda x: (x[0][0], str(x[0][1]))):
        out.append(f"| {peer} | {k[0]}, {k[1] // 1024}k | {p['tokens_per_s']:,.0f} | {p['peak_reserved_gib']:.2f} |")
    return out


def real_table(results: list[dict]) -> list[str]:
    """The real path (bench/real_train.py: `codetune train` on prepared real code) beside the synthetic step
    and Unsloth of the same call, and the planner's prediction of each run."""
    real = [r for r in results if r.get("path", "").startswith("codetune train")]
    if not real:
        return []
    synth = {r["seq"]: r for r in results if r.get("engine") == "codetune" and r.get("quant") == "nf4"
             and not r.get("last_layers") and "tokens_per_s" in r}
    unsloth = {r["seq"]: r for r in results if r.get("peer") == "unsloth" and r.get("quant", "nf4") == "nf4"}
    out = ["## The real path: `codetune train` on prepared real code (10 GB preset)", "",
           "Median tokens/s of the steady-state steps (from step 6; validation not in a step's time), the whole "
           "run's tokens/s with validation and checkpoints, and the peak reserved memory of the training steps "
           "and of validation, against the synthetic step (one random sequence) and Unsloth's synthetic step in "
           "the same call, and against `codetune plan`.", "",
           "| config | length | real tok/s | wall tok/s | vs synthetic | vs Unsloth | train GiB | val GiB "
           "| vs synthetic GiB | planned GiB | planner error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(real, key=lambda r: (r.get("repo", ""), r["config"], r["seq"])):
        name = r["config"] + (f" [checkout {r['checkout']}]" if r.get("checkout") else
                              " (previous commit)" if not r.get("repo", "").endswith("main") else "")
        if "error" in r:
            out.append(f"| {name} | {r['seq'] // 1024}k | failed: {r['error'][:80]} |" + " |" * 8)
            continue
        syn, uns = synth.get(r["seq"]), unsloth.get(r["seq"])
        train = r.get("train_peak_reserved_gib", r.get("peak_reserved_gib"))
        val = r.get("val_peak_reserved_gib")
        plan = r.get("planned_reserved_gib")
        peak = max(x for x in (train, val) if x is not None)
        cells = [name, f"{r['seq'] // 1024}k", f"{r['median_tok_per_s']:,.0f}", f"{r['wall_tok_per_s']:,.0f}",
                 f"{r['median_tok_per_s'] / syn['tokens_per_s']:.2f}×" if syn else "–",
                 f"{r['median_tok_per_s'] / uns['tokens_per_s']:.2f}×" if uns else "–",
                 f"{train:.2f}", "–" if val is None else f"{val:.2f}",
                 f"{peak / syn['peak_reserved_gib']:.2f}×" if syn else "–",
                 "–" if plan is None else f"{plan:.2f}",
                 "–" if plan is None else f"{(plan - peak) / peak:+.1%}"]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def checks_table(results: list[dict], dirs: list[Path]) -> list[str]:
    """bench/suites/checks.txt's correctness lines: the packed-attention kernels (bench/attn_kernels.py),
    the 200-step loss parity (bench/loss_parity.py) and the GPU tests' last line."""
    out = []
    attn = [r for r in results if r.get("check") == "packed-attention-kernels"]
    if attn:
        out += ["## Attention over packed documents (bench/attn_kernels.py)", "",
                "Forward + backward of one packed row at stable-code-3b's attention shape (32 heads x 80), bf16, "
                "against per-document attention in fp32. *Leaks*: does the last document's output change when "
                "every other document's keys and values do (it must stay bit-identical).", "",
                "| length | documents | kernel | fwd+bwd ms | max rel. error vs fp32 | leaks | exact | fastest exact |",
                "|---|---|---|---|---|---|---|---|"]
        for r in attn:
            for name, k in r["kernels"].items():
                if "error" in k:
                    out.append(f"| {r['seq'] // 1024}k | {r['documents']} | {name} | failed: {k['error'][:80]} | | | | |")
                    continue
                out.append(f"| {r['seq'] // 1024}k | {r['documents']} | {name} | {k['fwd_bwd_ms']:.2f} | "
                           f"{k['max_rel_err_vs_fp32']:.4f} | {'yes' if k['leaks_across_documents'] else 'no'} | "
                           f"{'yes' if k['exact'] else 'no'} | {'**yes**' if r['fastest_exact'] == name else ''} |")
        out.append("")
    for r in results:
        if r.get("check") == "loss-parity":
            out += ["## Loss parity (bench/loss_parity.py)", "",
                    f"{r['steps']} steps at {r['seq']} tokens against the HF + PEFT + bitsandbytes recipe's curve "
                    f"({r.get('hf_from') or 'same call'}): max relative difference {r['max_rel_diff']:.2%}, "
                    f"mean {r['mean_rel_diff']:.2%} (bound 1%).", ""]
    tests = [(d, f) for d in dirs for f in sorted(d.glob("gpu_tests*.txt"))]
    if tests:
        out += ["## GPU tests (tests/gpu)", ""]
        out += [f"- {f.name}: {(f.read_text().strip().splitlines() or ['(empty)'])[-1].strip('= ')}" for _, f in tests]
        out.append("")
    return out


def replan(results: list[dict]) -> str:
    """The current planner's predictions for the real runs; returns the commit they come from."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).parent))
    from real_train import predict

    for r in results:
        if r.get("path", "").startswith("codetune train") and "error" not in r:
            r.update(predict(r["overrides"], r["seq"]))
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--replan"]
    dirs, stem = [Path(a) for a in args[:-1]], Path(args[-1])
    loaded = [load(d) for d in dirs]
    env, results = dict(loaded[0][0]), [r for _, rs in loaded for r in rs]
    for key in ("suite", "commit"):  # one record of several calls names every suite and commit
        env[key] = " + ".join(dict.fromkeys(str(e.get(key)) for e, _ in loaded))
    planned_at = replan(results) if "--replan" in sys.argv else None
    date = datetime.date.today().isoformat()
    stem.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": date, "env": env, "results": results, **({"planned_at": planned_at} if planned_at else {})}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# Training throughput and memory — {env['gpu']}, {date}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}, accelerate {env['accelerate']}, Python {env['python']}. "
             "Random-init stable-code-3b shape, LoRA r=16 on all linear layers (unless noted), batch 1, "
             "5 warm-up + 10 timed steps, median. Ratios are against peers run in the same device call.", ""]
    if env.get("commit") or env.get("suite"):
        suites = ", ".join(f"`bench/suites/{s}.txt`" for s in env["suite"].split(" + "))
        lines += [f"Suites {suites}, commit {env.get('commit')}, run {env.get('date', date)}.", ""]
    if planned_at:
        lines += [f"Planned GiB: `codetune plan` at commit {planned_at} (tests/plan/test_real_runs.py holds it to "
                  "these runs), not the prediction made at measurement time.", ""]
    body = real_table(results) + table(results) + checks_table(results, dirs)
    stem.with_suffix(".md").write_text("\n".join(lines + body) + "\n")


if __name__ == "__main__":
    main()
