"""Single-stream decode speed (issue 17, item 1) of the random-init stable-code-3b shape, batch 1, warm:
codetune's decode loop eager / static KV cache / static + CUDA graphs / the same with the step compiled
(torch.compile, experimental), against transformers' `generate`
with its dynamic cache and with cache_implementation="static" (which transformers compiles on CUDA), on
the same loaded model in the same process. Random weights make the text meaningless but the speed real
(same shapes, same kernels); generation never stops early (no EOS), so every mode makes the same number of
tokens. Cases: (a) 2,000-token prompt + 32 new, (b) 32-token prompt + 128 new, (c) fill-in-the-middle with a
1,500-token prefix and a 500-token suffix + 32 new.

    python3 bench/decode_bench.py --tokenizer tests/fixtures/gpt-neox-20b.json --max-vram 10GiB \\
        [--precisions bf16 nf4] [--modes ...] [--cases a b c] [--repeats 5] [--out results.jsonl]

One JSON line per (precision, case, mode) on stdout (and appended to --out): median latency over
--repeats after one untimed warm-up run, tok/s (new tokens / latency, the issue's measure), time to the
first token, decode tok/s after it, and whether the greedy ids equal codetune's eager loop's. The first
line names the GPU, versions and date. CPU self-check: --model tiny-stablelm --device cpu (graph mode is
reported as skipped there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from model_source import add_model_flags, model_config, model_error, model_label  # noqa: E402

MODES = ("codetune-eager", "codetune-static", "codetune-graph", "codetune-compiled", "hf-dynamic", "hf-static")
CASES = {"a": (2000, 0, 32), "b": (32, 0, 128), "c": (1500, 500, 32)}  # prefix tokens, suffix tokens, new
CODE = ("import json\nfrom pathlib import Path\n\n\ndef read_config(path: Path) -> dict:\n"
        "    \"\"\"Load a JSON config, with defaults.\"\"\"\n    text = path.read_text(encoding='utf-8')\n"
        "    data = json.loads(text)\n    for key, value in DEFAULTS.items():\n"
        "        data.setdefault(key, value)\n    return data\n\n\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="tests/fixtures/gpt-neox-20b.json")
    add_model_flags(p, "the CPU self-check")
    p.add_argument("--precisions", nargs="+", default=None, help="default: bf16 nf4 on CUDA, fp32 on the CPU")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-kernels", default=None, help="comma-separated attention kernels of codetune's static-cache "
                   "passes (split,fused-qkv,fused-rotary,flash,efficient,math; default: model/step_attention.STEP_KERNELS), an A/B: e.g. "
                   "flash,efficient,math for SDPA alone")
    p.add_argument("--max-vram", default=None, help="cap this process's GPU memory, e.g. 10GiB")
    p.add_argument("--device", default="auto", help="auto, cuda, cpu")
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    return p.parse_args(argv)


def emit(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def environment(device: torch.device, a) -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "cuda": torch.version.cuda}
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or '?'})"
    return {"bench": "decode", "gpu": gpu, **model_label(a), "max_vram": a.max_vram, "repeats": a.repeats,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "versions": v}


def case_ids(tok, name: str) -> list[int]:
    from codetune.export.sampling import fim_layout, prompt_ids

    n_prefix, n_suffix, _ = CASES[name]
    code = prompt_ids(tok, CODE * (1 + 3 * (n_prefix + n_suffix) // len(prompt_ids(tok, CODE))))
    if not n_suffix:
        return code[:n_prefix]
    return fim_layout(tok, code[:n_prefix], code[n_prefix:n_prefix + n_suffix])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_codetune(model, ids, new, vocab_limit, decoder, device):
    from codetune.export.sampling import SamplingParams, generate_ids

    sync(device)
    t0 = time.perf_counter()
    first, out = None, []
    for tok in generate_ids(model, ids, SamplingParams(max_new_tokens=new), vocab_limit, set(), decoder):
        if first is None:
            first = time.perf_counter()  # int(token) inside the loop has synchronised already
        out.append(tok)
    sync(device)
    return out, time.perf_counter() - t0, first - t0


def run_hf(model, ids, new, vocab_limit, static: bool, device):
    x = torch.tensor([ids], device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0,
              attention_mask=torch.ones_like(x))
    n_vocab = model.get_input_embeddings().weight.shape[0]
    if n_vocab > vocab_limit:  # the embedding's padding rows, which codetune's loop never samples either
        kw["suppress_tokens"] = list(range(vocab_limit, n_vocab))
    if static:
        kw["cache_implementation"] = "static"
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        seq = model.generate(x, **kw)
    sync(device)
    return seq[0, len(ids):].tolist(), time.perf_counter() - t0, None


def tie_margin(model, ids: list[int], reference: list[int], out_ids: list[int], at: int, device) -> dict:
    """Was a greedy mismatch a near-tie? Random weights give near-uniform logits, so two exact-to-rounding
    paths (different attention kernels, cache layouts) can pick different ids where the top two logits are
    within bf16 rounding of each other. One uncached forward over the prompt and the eager loop's first
    `at` ids gives the logits both paths chose from: the gap between the eager id's logit and the other
    path's id's, beside the top logit. A tie: a gap of at most two bf16 units in the last place at the top
    logit's magnitude (the logits come out of the bf16 head; one summation order apart is an ulp or two)."""
    if at >= min(len(reference), len(out_ids)):
        return {}
    x = torch.tensor([ids + reference[:at]], device=device)
    with torch.inference_mode():
        logits = model(input_ids=x, logits_to_keep=1).logits[0, -1].float()
    gap = float(logits[reference[at]] - logits[out_ids[at]])
    top = float(logits.max())
    return {"mismatch_logit_gap": round(gap, 5), "top_logit": round(top, 4), "near_tie": gap_ulps(gap, top) <= 2}


def gap_ulps(gap: float, top: float) -> float:
    """A logit gap in bf16 units in the last place at the top logit's magnitude (7 explicit mantissa bits)."""
    return abs(gap) / 2.0 ** (math.floor(math.log2(max(abs(top), 2**-100))) - 7)


def measure(a, precision: str, device: torch.device) -> None:
    from codetune.export.generate import load_for_inference
    from codetune.export.static_decode import Decoder

    cfg = model_config(a, precision)
    t = time.perf_counter()
    model, tok, _ = load_for_inference(cfg, None, device)
    load_s = time.perf_counter() - t
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab_limit = min(len(tok), model.get_input_embeddings().weight.shape[0])
    decoders = {}
    from codetune.model.step_attention import STEP_KERNELS

    kernels = tuple(a.step_kernels.split(",")) if a.step_kernels else STEP_KERNELS
    for mode in ("eager", "static", "graph", "compiled"):
        try:
            decoders[mode] = Decoder(model, mode, step_kernels=kernels)
        except ValueError as e:
            decoders[mode] = str(e)
    for case in a.cases:
        ids, new = case_ids(tok, case), CASES[case][2]
        reference = None
        for mode in a.modes:
            base = {**model_label(a), "precision": precision, "case": case, "mode": mode, "prompt_tokens": len(ids),
                    "new_tokens": new, "weight_gb": round(weight_bytes / 1e9, 3), "load_s": round(load_s, 1)}
            kind = mode.split("-", 1)[1]
            decoder = decoders.get(kind) if mode.startswith("codetune") else None
            if isinstance(decoder, str):
                emit({**base, "skipped": decoder}, a.out)
                continue

            run = (lambda: run_codetune(model, ids, new, vocab_limit, decoder, device)) if decoder is not None \
                else (lambda: run_hf(model, ids, new, vocab_limit, kind == "static", device))  # noqa: B023
            try:
                run()  # warm-up: kernels, graph capture, transformers' compilation
                runs = [run() for _ in range(a.repeats)]
            except Exception as e:  # noqa: BLE001 - one mode failing must not lose the others' numbers
                emit({**base, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"}, a.out)
                continue
            out_ids = runs[0][0]
            if mode == "codetune-eager":
                reference = out_ids
            latency = statistics.median(r[1] for r in runs)
            ttfts = [r[2] for r in runs if r[2] is not None]
            ttft = statistics.median(ttfts) if ttfts else None
            mismatch = None if reference is None else next(
                (i for i, (x, y) in enumerate(zip(out_ids, reference)) if x != y),
                None if len(out_ids) == len(reference) else min(len(out_ids), len(reference)))
            record = {**base, "latency_s": round(latency, 4), "tok_s": round(new / latency, 1),
                      "ttft_s": None if ttft is None else round(ttft, 4),
                      "decode_tok_s": None if ttft is None or latency <= ttft else round((new - 1) / (latency - ttft), 1),
                      "latencies_s": [round(r[1], 4) for r in runs],
                      "greedy_equals_eager": None if reference is None else mismatch is None,
                      "first_mismatch": mismatch, "new_ids_made": len(out_ids)}
            if mismatch is not None:
                record.update(tie_margin(model, ids, reference, out_ids, mismatch, device))
            if decoder is not None:
                record["decode"] = decoder.describe()
                if decoder.attention is not None:
                    record["step_kernels"] = ",".join(decoder.attention.kernels)
                    record["split_attention"] = "on" if decoder.attention.name else (
                        decoder.attention.why_not or "not asked for")
                    record["fused_qkv"] = decoder.attention.qkv_fused
                    record["fused_rotary"] = decoder.attention.rotary_fused
                    rotary = decoder.attention.rotary
                    if rotary is not None and rotary.why_not:
                        record["fused_rotary_why_not"] = rotary.why_not
                record["decode_stats"] = vars(decoder.stats).copy()
            if device.type == "cuda":
                record["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            emit(record, a.out)
    decoders.clear()  # their caches and graphs; the model goes when the caller drops it


def main(argv=None) -> int:
    from codetune.model.load import pick_device
    from codetune.train.memory import cap_vram

    a = parse_args(argv)
    error = model_error(a)
    if error:
        print(error, file=sys.stderr)
        return 2
    device = pick_device(a.device)
    cap_vram(a.max_vram, device)
    precisions = a.precisions or (["bf16", "nf4"] if device.type == "cuda" else ["fp32"])
    emit({**environment(device, a), "precisions": precisions}, a.out)
    for precision in precisions:
        measure(a, precision, device)
        if device.type == "cuda":  # the next precision's peak is its own
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
