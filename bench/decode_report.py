"""Turn device calls' inference results (bench/decode_bench.py, bench/graph_exactness.py,
bench/humaneval_throughput.py's comparison files) into the committed record: JSON, a Markdown table with
ratios within each call, and a latency plot (issue 17).

Usage: python3 bench/decode_report.py RESULTS_DIR [RESULTS_DIR ...] OUT_STEM
Each RESULTS_DIR is one call's $OUT (results.jsonl, env.json, humaneval_compare_*.json); calls are kept
apart (absolute speeds differ between machines, so ratios are only taken within one call).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode_bench import gap_ulps  # noqa: E402  (the one rule for what a gap is)

CASES = {"a": "2,000-token prompt + 32 new", "b": "32-token prompt + 128 new", "c": "FIM 1,500 + 500 around, 32 new"}


def load(d: Path) -> dict:
    env = json.loads((d / "env.json").read_text().splitlines()[0])
    rows = [json.loads(ln)["result"] for ln in (d / "results.jsonl").read_text().splitlines() if ln.strip()]
    run = 0
    for r in rows:  # each decode_bench process starts with its header record: ratios stay within one process
        if r.get("bench") == "decode" and "mode" not in r:
            run += 1
        elif "mode" in r:
            r["run"] = run
    evals = [json.loads(f.read_text()) for f in sorted(d.glob("humaneval_compare_*.json"))]
    return {"dir": d.name, "env": env, "decode": [r for r in rows if "mode" in r],
            "exactness": [r for r in rows if r.get("check") == "graph-exactness"], "eval": evals,
            "agreement": [r for r in rows if "kinds" in r and "modes" in r],  # bench/decode_agreement.py
            "serve": [r for r in rows if r.get("bench") == "serve"]}  # bench/serve_latency.py


def model_of(call: dict) -> str:
    """The model the call's records name (decode_bench and humaneval_throughput say which), else the
    random-init shape, which records from before they said so were all run on."""
    names = {(r.get("model"), r.get("trained")) for r in call["decode"] + [ev["runs"][0] for ev in call["eval"] if ev["runs"]]}
    names.discard((None, None))
    if not names:
        return "random-init stable-code-3b shape"
    return ", ".join(f"trained model {m}" if trained else f"random-init {m} shape" for m, trained in sorted(names))


def greedy_cell(r: dict) -> str:
    if r.get("greedy_equals_eager") is None:
        return "(reference)" if r["mode"] == "codetune-eager" else "–"
    if r["greedy_equals_eager"]:
        return "identical"
    if r.get("mismatch_logit_gap") is None:
        return f"differs from token {r['first_mismatch']} (gap not measured)"
    ulps = gap_ulps(r["mismatch_logit_gap"], r["top_logit"])
    return f"differs from token {r['first_mismatch']} (gap {ulps:.1f} bf16 ulps)"


def attention_cell(r: dict) -> str:
    """The static-cache step's attention (model/step_attention.py); records from before it was chosen: SDPA."""
    if r["mode"] in ("codetune-eager",) or r["mode"].startswith("hf-"):
        return "SDPA"
    why = r.get("split_attention")
    kernel = "split-KV" if why == "on" else "SDPA" if why in (None, "not asked for") else f"SDPA ({why[:60]})"
    return (kernel + (", fused q\\|k\\|v" if r.get("fused_qkv") else "")
            + (", fused rotary" if r.get("fused_rotary") else ""))


def decode_table(call: dict) -> list[str]:
    rows = [r for r in call["decode"] if "tok_s" in r or "error" in r]
    runs = sorted({r.get("run", 0) for r in rows})
    out = []
    for run in runs:  # one table per decode_bench process (its eager loop and its generate are the ratios' base)
        out += _decode_rows([r for r in rows if r.get("run", 0) == run])
    return out


def _decode_rows(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    eager = {(r["precision"], r["case"]): r for r in rows if r["mode"] == "codetune-eager" and "tok_s" in r}
    hf = {(r["precision"], r["case"]): r for r in rows if r["mode"] == "hf-dynamic" and "tok_s" in r}
    out = ["| precision | case | mode | attention | tok/s | latency s | vs codetune eager | vs transformers generate "
           "| greedy vs codetune eager | graphs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = (r["precision"], r["case"])
        if "error" in r:
            out.append(f"| {k[0]} | {k[1]} | {r['mode']} | | failed: {r['error'][:90]} | | | | | |")
            continue
        e, h = eager.get(k), hf.get(k)
        stats = r.get("decode_stats") or {}
        graphs = ("–" if not stats else f"{stats['captured']} captured" if stats.get("captured")
                  else f"off: {stats['fallback']}" if stats.get("fallback") else "none")
        vs_eager = f"{r['tok_s'] / e['tok_s']:.2f}×" if e else "–"
        vs_hf = f"{r['tok_s'] / h['tok_s']:.2f}×" if h else "–"
        out.append(f"| {k[0]} | {k[1]} | {r['mode']} | {attention_cell(r)} | {r['tok_s']:,.1f} | {r['latency_s']:.3f} | {vs_eager} | "
                   f"{vs_hf} | {greedy_cell(r)} | {graphs} |")
    return out + [""]


def exactness_table(call: dict) -> list[str]:
    if not call["exactness"]:
        return []
    out = ["| precision | variant | result |", "|---|---|---|"]
    for r in call["exactness"]:
        if "error" in r:
            res = f"failed: {r['error']}"
        elif "captured" in r:
            res = "graph exact (bit-identical replay)" if r["captured"] else r["why"]
        else:
            res = f"max abs logit difference {r['max_abs_diff']}"
        out.append(f"| {r['precision']} | {r['variant']} | {res} |")
    return out + [""]


def eval_table(call: dict) -> list[str]:
    out = []
    for ev in call["eval"]:
        c = ev["comparison"]
        run0 = ev["runs"][0] if ev["runs"] else {}
        budget = f"up to {run0['max_new_tokens']} new tokens each" if "max_new_tokens" in run0 else "384 new tokens each"
        out += [f"HumanEval, first {c['problems']} problems, batch {c['batch_size']}, {c['precision']}, {budget}"
                + ("" if run0.get("trained") else " (random weights never stop early)") + ":", "",
                "| decode | samples/s | new tokens/s | peak reserved GiB | graphs | speed-up | completions vs eager |",
                "|---|---|---|---|---|---|---|"]
        for r in ev["runs"]:
            dec = r.get("decoder") or {}
            graphs = (f"{dec['captured']} captured" if dec.get("captured") else
                      f"off: {dec['fallback']}" if dec.get("fallback") else "–")
            same = c["identical_completions"].get(r["decode"])
            diff = len(c.get("differing_problems", {}).get(r["decode"], []))
            out.append(f"| {r['decode']} | {r['samples_per_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                       f"{r['peak_reserved_gib']:.2f} | {graphs} | "
                       f"{c['speedup_vs_first'].get(r['decode'], 1.0):.2f}× | "
                       f"{'(reference)' if same is None else 'identical' if same else f'{diff} differ'} |")
        out.append("")
    return out


def agreement_table(call: dict) -> list[str]:
    """FIM scores of two decode modes on the same items (bench/decode_agreement.py)."""
    out = []
    for r in call["agreement"]:
        a, b = r["modes"]
        out += [f"FIM on the same tasks, `{a}` against `{b}` (items matched by content; changes {b} − {a} with "
                "95% intervals):", "",
                f"| kind | items | exact {a} | exact {b} | edit sim. {a} | edit sim. {b} | predictions differing | "
                "exact change | edit sim. change |", "|---|---|---|---|---|---|---|---|---|"]
        for kind, k in r["kinds"].items():
            ch = [f"{c['estimate']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
                  for c in (k["exact_change"], k["edit_similarity_change"])]
            out.append(f"| {kind} | {k['items']} | {k[f'exact_{a}']:.1%} | {k[f'exact_{b}']:.1%} | "
                       f"{k[f'edit_similarity_{a}']:.1%} | {k[f'edit_similarity_{b}']:.1%} | "
                       f"{k['predictions_differing']} | {ch[0]} | {ch[1]} |")
        verdict = ("identical predictions" if r["same_scores"] else "no significant change"
                   if r["no_significant_change"] else "**a significant change**")
        out += ["", f"Verdict: {verdict}.", ""]
    return out


def serve_table(call: dict) -> list[str]:
    """`codetune serve` end to end through the openai client (bench/serve_latency.py): one table row per
    phase of each server configuration; the server's own decoding line under it."""
    rows = [r for r in call["serve"] if "p50_ms" in r]
    if not rows:
        return []
    r0 = rows[0]
    out = [f"`codetune serve`, FIM requests of {r0['prefix_tokens']:,} + {r0['suffix_tokens']:,} tokens around, "
           f"{r0['new_tokens']} new, greedy, through the openai client ({r0['precision']}, --decode {r0['decode']}):", "",
           "| serve flags | clients | answered | p50 ms | p95 ms | new tokens/s | aggregate vs one client |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        agg = r.get("aggregate_vs_one_client")
        out.append(f"| {' '.join(r['serve_flags']) or '(defaults)'} | {r['clients']} | {r['answered']}/{r['requests']} | "
                   f"{r['p50_ms']:,.1f} | {r['p95_ms']:,.1f} | {r['tokens_per_s']:,.1f} | "
                   f"{'–' if agg is None else f'{agg:.2f}×'} |")
    servers = [r["decoding"] for r in call["serve"] if r.get("phase") == "server"]
    return out + [""] + [f"- {d}" for d in servers] + [""]


def plot(calls: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = {}  # (precision, case, mode) -> latency: each from the latest call that measured it
    for call in calls:
        for r in call["decode"]:
            if "latency_s" in r:
                split = " split-KV" if r.get("split_attention") == "on" else ""
                last[(r["precision"], r["case"], r["mode"] + split)] = r["latency_s"]
    if not last:
        return False
    keys = sorted({(p, c) for p, c, _ in last})
    modes = sorted({m for _, _, m in last})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        ax.bar([j + i * width for j in range(len(keys))], [last.get((p, c, m), 0) * 1e3 for p, c in keys],
               width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"{p} {c}" for p, c in keys])
    ax.set_ylabel("latency, ms (lower is better)")
    ax.set_title("batch-1 decode latency, random-init stable-code-3b, H200: each bar from the latest call that ran it (see the .md)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    dirs, stem = [Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1])
    calls = [load(d) for d in dirs]
    date = datetime.date.today().isoformat()
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "calls": calls}, indent=1))
    env = calls[0]["env"]
    lines = [f"# Inference speed — {env['gpu']}, {date}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, bitsandbytes {env['bitsandbytes']}, "
             f"Python {env['python']}. `--max-vram 10GiB`, batch 1, warm; "
             "median latency of the repeats. Cases: " + "; ".join(f"({k}) {v}" for k, v in CASES.items()) + ". "
             "Ratios only within a call. Where greedy ids differ from codetune's eager loop, the gap is the eager loop's "
             "logits at that token, its id's against the other path's, in bf16 units in the last place: random "
             "weights give near-uniform logits, so two kernels that are each exact to rounding (a different "
             "attention kernel, a padded cache) pick different ids at near-ties. The greedy rule is held on "
             "trained tiny models by tests/export/test_static_decode.py and tests/eval/test_batch_decode*.py.", ""]
    for call in calls:
        e = call["env"]
        lines += [f"## Call {call['dir']}: suite {e.get('suite')}, commit {e.get('commit')}", "",
                  f"Model: {model_of(call)}.", ""]
        lines += (exactness_table(call) + decode_table(call) + eval_table(call) + agreement_table(call)
                  + serve_table(call))
    if plot(calls, stem.with_suffix(".png")):
        lines += [f"![latency]({stem.with_suffix('.png').name})", ""]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
