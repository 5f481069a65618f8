"""`codetune export gguf` on a random-init model of stable-code-3b's exact shape (random weights are fine for
correctness: the same code path, the same shapes): exports each --quants type, loads it in llama.cpp, and
compares llama.cpp's logits with transformers' (fp32, CPU) on code + random tokens; reports file size, export
and load time, and llama.cpp's CPU prompt and generation tokens/s. One JSON object on stdout.

Usage (the GPU machine: the 3B needs ~30 GB of RAM for the fp32 reference and the files, and cores):
  python3 bench/gguf_check.py --model stable-code-3b --quants f16 q8_0 --work /tmp/gguf-check \\
      --tokenizer tests/fixtures/gpt-neox-20b.json [--threads 16] [--wrong-rope]
`--model tiny-stablelm` runs the same in seconds (what a developer's machine can do). --wrong-rope also
exports f16 with rope base 10,000, the value llama.cpp falls back to for files from its own converter, to
show what the missing stablelm.rope.freq_base costs.

Needs gguf and llama-cpp-python. The GPU machine has no network: carry wheels of gguf, diskcache and
llama-cpp-python (llama-cpp-python's wheel holds ctypes bindings, tagged py3-none-linux_x86_64; build it
there from its sdist with CMAKE_ARGS="-DLLAVA_BUILD=OFF" so it uses that CPU's instruction set, or the
tokens/s measure a generic x86-64 build).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from codetune.export.gguf_export import QUANTS, export_gguf  # noqa: E402
from codetune.model.load import padded_vocab, random_init_checkpoint  # noqa: E402
from codetune.model.tokenizer import ensure_special_tokens  # noqa: E402

CODE = ("import json\nfrom pathlib import Path\n\n\ndef read_config(path: Path) -> dict:\n"
        "    \"\"\"Load a JSON config, with defaults.\"\"\"\n    text = path.read_text(encoding='utf-8')\n"
        "    data = json.loads(text)\n    for key, value in DEFAULTS.items():\n"
        "        data.setdefault(key, value)\n    return data\n")


def model_dir(name: str, tokenizer: str, work: Path) -> tuple[Path, object]:
    """A model folder as `codetune merge` writes one: the random-init checkpoint (linked, not copied) and the
    tokenizer with stable-code's special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = ensure_special_tokens(PreTrainedTokenizerFast(tokenizer_file=tokenizer))
    ckpt = random_init_checkpoint(name, vocab_size=padded_vocab(tok))
    d = work / f"{name}-model"
    if not (d / "tokenizer.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        for f in ckpt.iterdir():
            if not (d / f.name).exists():
                os.symlink(f.resolve(), d / f.name)
        tok.save_pretrained(str(d))
    return d, tok


def reference_logits(d: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].numpy()
    del model
    return out


def run_llama(path: Path, ids: list[int], want: np.ndarray, threads: int, gen_tokens: int) -> dict:
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=max(1024, len(ids) + gen_tokens), n_batch=512, n_threads=threads,
                          logits_all=True, verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        llm.eval(ids)
        prompt_s = time.perf_counter() - t0
        got = np.array(llm.scores[:len(ids)])
        diff = np.abs(got - want)
        llm.reset()
        n, first = 0, None
        for _ in llm.generate(ids[:64], temp=0.0):  # greedy; the first token also pays for the 64-token prompt
            n += 1
            if first is None:
                first = time.perf_counter()
            if n >= gen_tokens:
                break
        gen_s = time.perf_counter() - first
    finally:
        llm.close()
    return {"file": str(path), "size_bytes": path.stat().st_size, "size_gib": round(path.stat().st_size / 2**30, 3),
            "load_s": round(load_s, 2), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": float(np.abs(want).max()),
            "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
            "prompt_tokens_per_s": round(len(ids) / prompt_s, 1), "gen_tokens_per_s": round((n - 1) / gen_s, 2),
            "gen_tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stable-code-3b", choices=["stable-code-3b", "tiny-stablelm"])
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0"], choices=QUANTS)
    ap.add_argument("--tokenizer", default="tests/fixtures/gpt-neox-20b.json")
    ap.add_argument("--work", default="/tmp/gguf-check", help="where the model folder and the files go")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seq", type=int, default=256, help="tokens of the logits comparison")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--wrong-rope", action="store_true", help="also an f16 file with rope base 10,000")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    d, tok = model_dir(a.model, a.tokenizer, work)
    code = tok.encode(CODE, add_special_tokens=False)
    rand = torch.randint(0, len(tok), (max(0, a.seq - len(code)),), generator=torch.Generator().manual_seed(0))
    ids = (code + rand.tolist())[:a.seq]
    t0 = time.perf_counter()
    want = reference_logits(d, ids)
    result = {"model": a.model, "random_init": True, "seq": len(ids), "threads": a.threads,
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "reference": "transformers fp32 CPU", "reference_s": round(time.perf_counter() - t0, 1), "quants": {}}
    for q in a.quants:
        out = work / f"{a.model}-{q}.gguf"
        for p in (out, out.with_suffix(".Modelfile")):
            p.unlink(missing_ok=True)  # this script's own files from an earlier run
        t0 = time.perf_counter()
        export_gguf(out, q, model_dir=d)
        export_s = time.perf_counter() - t0
        result["quants"][q] = {"export_s": round(export_s, 1), **run_llama(out, ids, want, a.threads, a.gen_tokens)}
        print(json.dumps({q: result["quants"][q]}), file=sys.stderr, flush=True)
    if a.wrong_rope:
        import dataclasses

        from codetune.export.gguf_file import prepare_conversion, write_gguf

        conv = prepare_conversion(d, "f16")
        bad = dataclasses.replace(conv, shape=dataclasses.replace(conv.shape, rope_theta=10_000.0))
        out = work / f"{a.model}-f16-rope10k.gguf"
        out.unlink(missing_ok=True)
        write_gguf(bad, out, out.stem)
        result["f16_rope_base_10000"] = run_llama(out, ids, want, a.threads, 8)
    import gguf
    import llama_cpp

    result["versions"] = {"gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                          "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__}
    print(json.dumps(result, indent=1))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
