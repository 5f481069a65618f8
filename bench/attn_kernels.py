"""Which exact attention over packed documents is fastest (issue 13, target 2): on stable-code-3b's attention
shape, one packed row of documents, forward + backward of each candidate, checked against the per-document
result in fp32 (no token may see another document), then timed:

* varlen flash — codetune's default on CUDA sm80+ (model/attention.document_attention);
* per-document SDPA — its fallback (one causal call per document);
* FlexAttention with a document block mask (torch.nn.attention.flex_attention, compiled);
* dense-mask SDPA — what transformers did before (an L x L block-causal bool mask): the baseline.

Document lengths are drawn from a log-normal close to source files' token counts (seeded), packed into rows
of --seq tokens; the last document of a row is cut at the row's end, as prepare cuts it.

Usage (GPU machine, project root): python3 bench/attn_kernels.py --seq 4096 16384
Prints one JSON line per length.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from codetune.model import attention as A  # noqa: E402

HEADS, HEAD_DIM = 32, 80  # stable-code-3b


def row_lengths(seq: int, rng: random.Random) -> list[int]:
    out = []
    while sum(out) < seq:
        out.append(max(16, int(rng.lognormvariate(6.8, 1.1))))  # median ~900 tokens
    out[-1] -= sum(out) - seq
    return [n for n in out if n > 0]


def dense_mask(lengths: list[int], dev) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
    t = doc.numel()
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    return causal & (doc[:, None] == doc[None, :])


def candidates(lengths: list[int], dev):
    """name -> f(q, k, v) with q, k, v as (tokens, heads, head_dim); each returns the same layout."""
    cu_list = [0]
    for n in lengths:
        cu_list.append(cu_list[-1] + n)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=dev)
    scale = HEAD_DIM ** -0.5
    out = {"varlen_flash": lambda q, k, v: A.document_attention(q, k, v, cu, max(lengths), scale),
           "per_document_sdpa": lambda q, k, v: A._per_document(q, k, v, cu_list, scale)}
    mask = dense_mask(lengths, dev)

    def dense(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask, scale=scale)
        return o[0].transpose(0, 1)
    out["dense_mask_sdpa"] = dense
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))

        def same_doc_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)
        t = doc.numel()
        block = create_block_mask(same_doc_causal, None, None, t, t, device=dev)
        flex = torch.compile(flex_attention)

        def flex_fn(q, k, v):
            o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     block_mask=block, scale=scale)
            return o[0].transpose(0, 1)
        out["flex_attention"] = flex_fn
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the other candidates still run
        out["flex_attention"] = e
    return out, cu_list


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def fwd_bwd(fn, q, k, v, grad) -> list[torch.Tensor]:
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    o = fn(q, k, v)
    return [o, *torch.autograd.grad(o, (q, k, v), grad)]


def measure(seq: int, iters: int, seed: int, device: str = "cuda") -> dict:
    dev = torch.device(device)
    lengths = row_lengths(seq, random.Random(seed))
    g = torch.Generator(dev).manual_seed(seed)
    q, k, v, grad = (torch.randn(seq, HEADS, HEAD_DIM, device=dev, generator=g).bfloat16() for _ in range(4))
    fns, cu_list = candidates(lengths, dev)
    q32, k32, v32 = (x.float().requires_grad_(True) for x in (q, k, v))
    ref_o = A._per_document(q32, k32, v32, cu_list, HEAD_DIM ** -0.5)
    ref = [ref_o.detach(), *torch.autograd.grad(ref_o, (q32, k32, v32), grad.float())]
    res = {"check": "packed-attention-kernels", "seq": seq, "documents": len(lengths), "lengths": lengths,
           "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "kernels": {}}
    for name, fn in fns.items():
        if isinstance(fn, Exception):
            res["kernels"][name] = {"error": f"{type(fn).__name__}: {str(fn)[:200]}"}
            continue
        try:
            got = fwd_bwd(fn, q, k, v, grad)  # (also compiles flex)
            err = max(rel(a, b) for a, b in zip(got, ref))
            for _ in range(3):
                fwd_bwd(fn, q, k, v, grad)
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fwd_bwd(fn, q, k, v, grad)
            sync()
            res["kernels"][name] = {"fwd_bwd_ms": round((time.perf_counter() - t0) / iters * 1e3, 3),
                                    "max_rel_err_vs_fp32": round(err, 5), "exact": err < 1e-2}
        except Exception as e:  # noqa: BLE001 - one failing candidate does not stop the others
            res["kernels"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    timed = {n: r["fwd_bwd_ms"] for n, r in res["kernels"].items() if r.get("exact")}
    res["fastest_exact"] = min(timed, key=timed.get) if timed else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    a = ap.parse_args()
    for seq in a.seq:
        print(json.dumps(measure(seq, a.iters, a.seed, a.device)), flush=True)


if __name__ == "__main__":
    main()
