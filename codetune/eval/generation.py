"""Batched completion for evaluation: many prompts at once through transformers' `generate` (KV cache,
left padding, per-row stop strings), greedy or sampled. Interactive streaming lives in
codetune/export/generate.py; this module is about throughput and exact reproducibility."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class GenSettings:
    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95  # nucleus sampling as in the Codex paper (used only when sampling)
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    seed: int = 0


@dataclass
class GenStats:
    samples: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {"samples": self.samples, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "samples_per_s": round(self.samples / s, 4), "tokens_per_s": round(self.new_tokens / s, 2)}


def truncate_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cut the text at the earliest stop sequence (the stop itself is not part of the completion)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def generate(model, tok, prompts: list[str], settings: GenSettings, stats: GenStats | None = None,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Completions (prompt excluded, cut at the first stop sequence) in the order of `prompts`."""
    device = next(model.parameters()).device
    # Longest prompts first: the biggest batch runs first, so running out of memory shows up at once;
    # similar lengths together also waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    sampling = settings.temperature > 0
    kw = dict(max_new_tokens=settings.max_new_tokens, do_sample=sampling, use_cache=True,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if sampling:
        kw.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        torch.manual_seed(settings.seed)
    if settings.stop:
        from transformers import StoppingCriteriaList, StopStringCriteria

        # built once for all batches: it scans the whole vocabulary, which costs more than a short batch
        kw["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tok, list(settings.stop))])
    side, tok.padding_side = tok.padding_side, "left"  # new tokens must line up at the right edge
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for b in range(0, len(order), settings.batch_size):
            idx = order[b:b + settings.batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            seqs = model.generate(**enc, **kw)
            new = seqs[:, enc["input_ids"].shape[1]:].cpu()
            for row, i in zip(new, idx):
                ids = row.tolist()
                n = ids.index(tok.pad_token_id) + 1 if tok.pad_token_id in ids else len(ids)
                if stats is not None:
                    stats.new_tokens += n
                text = tok.decode(ids[:n], skip_special_tokens=True)
                out[i] = truncate_at_stop(text, settings.stop)
            if stats is not None:
                stats.samples += len(idx)
            if progress is not None:
                progress(len(idx))
    finally:
        tok.padding_side = side
        model.train(was_training)
        if stats is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats.seconds += time.perf_counter() - start
    return out
