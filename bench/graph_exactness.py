"""Is a CUDA-graphed decode step bit-identical to the eager step it replaces, and if not, why (issue 17)?

codetune's decoders keep a captured one-token step only if its first replay gives the eager step's logits
bit for bit (model/static_cache.capture_step). On an H200 the bf16 step's replay differed by rounding
(the NF4 step's did not), so bf16 decoding fell back to the static cache without graphs. This script
takes the random-init stable-code-3b shape, prefills a 2,000-token prompt into a StaticCache, and from that
one cache state compares, printing the max |logit difference| of each (0.0: identical):

* eager-repeat: the eager step twice on one stream (is the eager step itself deterministic?);
* eager-streams: the eager step on a side stream, then on the default stream;
* capture-same-stream: capture_step as codetune runs it (the graph captured on the reference's stream);
* capture-own-stream: captured on torch's own capture stream (how it was before);
* capture-no-cudnn, capture-math-sdpa: the same-stream capture with SDPA's cuDNN backend off / math only
  (does SDPA choose another kernel under capture?).

    python3 bench/graph_exactness.py --tokenizer tests/fixtures/gpt-neox-20b.json --precisions bf16 nf4
One JSON line per (precision, variant).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def variants():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return {"capture-same-stream": (True, contextlib.nullcontext), "capture-own-stream": (False, contextlib.nullcontext),
            "capture-no-cudnn": (True, lambda: sdpa_kernel(no_cudnn)),
            "capture-math-sdpa": (True, lambda: sdpa_kernel([SDPBackend.MATH]))}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def run(precision: str, a) -> None:
    from transformers import StaticCache

    from codetune.config import ModelConfig
    from codetune.export.generate import load_for_inference
    from codetune.model.adapters import causal_lm
    from codetune.model.static_cache import cache_kwarg, capture_step, rewind

    device = torch.device("cuda")
    cfg = ModelConfig(model=a.model, random_init=True, precision=precision, tokenizer=a.tokenizer)
    cfg.validate()
    model, tok, _ = load_for_inference(cfg, None, device)
    cache = StaticCache(config=causal_lm(model).config, max_cache_len=2048)
    kw = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    prompt = torch.randint(0, 50000, (1, a.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    token = torch.full((1, 1), 1234, dtype=torch.long, device=device)

    def step():
        return model(input_ids=token, **kw).logits

    def prefill():
        cache.reset()
        model(input_ids=prompt, **kw)
        torch.cuda.synchronize()

    def emit(variant: str, **rec) -> None:
        print(json.dumps({"check": "graph-exactness", "precision": precision, "variant": variant, **rec}), flush=True)

    with torch.inference_mode():
        prefill()
        first = step().clone()
        rewind(cache)
        emit("eager-repeat", max_abs_diff=diff(first, step()))
        prefill()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            on_side = step().clone()
        torch.cuda.current_stream(device).wait_stream(side)
        rewind(cache)
        emit("eager-streams", max_abs_diff=diff(on_side, step()))
        for name, (same_stream, backends) in variants().items():
            prefill()
            try:
                with backends():
                    got = capture_step(step, lambda: rewind(cache), device, same_stream=same_stream)
                emit(name, captured=got.graph is not None, why=got.why,
                     max_abs_diff=0.0 if got.graph is not None else None)
            except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
                emit(name, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default="tests/fixtures/gpt-neox-20b.json")
    ap.add_argument("--model", default="stable-code-3b")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "nf4"])
    ap.add_argument("--prompt", type=int, default=2000)
    a = ap.parse_args()
    for precision in a.precisions:
        run(precision, a)
        torch.cuda.empty_cache()  # (the model and cache went with run's frame)


if __name__ == "__main__":
    main()
