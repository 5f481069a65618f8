"""Batched completion for evaluation: many prompts at once, left-padded, cut at per-row stop strings,
greedy or sampled. Two ways to run a batch (GenSettings.decode): `eager`, transformers' `generate` with
its dynamic KV cache (the reference, and the only one that samples), and `batched`, greedy decoding
through a static KV cache with CUDA-graphed steps (eval/batch_decode.py), which gives the same ids.
Interactive streaming lives in codetune/export/generate.py; this module is about throughput and exact
reproducibility."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from codetune.config import ConfigError, EvalConfig
from codetune.fields import spec_of


@dataclass
class GenSettings:
    max_new_tokens: int = 384
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.95  # nucleus sampling as in the Codex paper (used only when sampling)
    stop: tuple[str, ...] = ()
    batch_size: int = 8
    seed: int = 0
    decode: str = "auto"  # EvalConfig.eval_decode


EVAL_DECODE_MODES = next(spec_of(f).choices for f in dataclasses.fields(EvalConfig) if f.name == "eval_decode")


def resolve_decode(settings: GenSettings, model) -> str:
    """The way a batch will run (see EvalConfig.eval_decode): `auto` resolved, sampling always eager;
    ConfigError (naming the fix) for a mode that cannot run."""
    from codetune.model.static_cache import static_unsupported

    if settings.decode not in EVAL_DECODE_MODES:
        raise ConfigError(f"eval_decode={settings.decode!r}: choose one of {', '.join(EVAL_DECODE_MODES)}")
    if settings.decode == "eager" or settings.temperature > 0:  # the batched path is greedy only
        return "eager"
    why = static_unsupported(model)
    if settings.decode == "batched" and why:
        raise ConfigError(f"--eval-decode batched: {why}; use --eval-decode eager or auto")
    # On CUDA auto stays eager: batched pays and gave the same scores on a trained checkpoint, but not the
    # same completions (bf16 near-ties under another attention kernel and cache layout: docs/eval.md), and a
    # speed-up may not change a greedy completion; --eval-decode batched chooses it.
    on_cuda = next(model.parameters()).device.type == "cuda"
    return "eager" if why or (settings.decode == "auto" and on_cuda) else "batched"


@dataclass
class GenStats:
    samples: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    decode: str = ""  # the mode that ran (the last call's)
    decoder: dict | None = None  # batch_decode.BatchStats of a batched run

    def as_dict(self) -> dict:
        s = max(self.seconds, 1e-9)
        d = {"samples": self.samples, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
             "samples_per_s": round(self.samples / s, 4), "tokens_per_s": round(self.new_tokens / s, 2)}
        if self.decode:
            d["decode"] = self.decode
        if self.decoder is not None:
            d["decoder"] = self.decoder
        return d


def truncate_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cut the text at the earliest stop sequence (the stop itself is not part of the completion)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def batch_order(prompts: list[str]) -> list[int]:
    """Longest prompts first: the biggest batch runs first, so running out of memory shows up at once;
    similar lengths together also waste less compute on padding. Both decode modes batch this way, so a
    prompt meets the same neighbours (and padding) in either."""
    return sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))


def _eager_batch(model, tok, enc: dict, kw: dict) -> list[list[int]]:
    seqs = model.generate(**enc, **kw)
    rows = seqs[:, enc["input_ids"].shape[1]:].tolist()
    # finished rows are filled with pad: a row ends at its first pad (EOS is pad for most code tokenizers)
    return [ids[:ids.index(tok.pad_token_id) + 1] if tok.pad_token_id in ids else ids for ids in rows]


@torch.no_grad()
def generate(model, tok, prompts: list[str], settings: GenSettings, stats: GenStats | None = None,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Completions (prompt excluded, cut at the first stop sequence) in the order of `prompts`."""
    from codetune.eval.batch_decode import BatchDecoder

    mode = resolve_decode(settings, model)
    device = next(model.parameters()).device
    order = batch_order(prompts)
    out: list[str] = [""] * len(prompts)
    sampling = settings.temperature > 0
    kw = dict(max_new_tokens=settings.max_new_tokens, do_sample=sampling, use_cache=True,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if sampling:
        kw.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        torch.manual_seed(settings.seed)
    if settings.stop and mode == "eager":
        from transformers import StoppingCriteriaList, StopStringCriteria

        # built once for all batches: it scans the whole vocabulary, which costs more than a short batch
        kw["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tok, list(settings.stop))])
    decoder = BatchDecoder(model) if mode == "batched" else None
    end_ids = [i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None]

    def stopped(_row: int, ids: list[int]) -> bool:
        text = tok.decode(ids, skip_special_tokens=True)
        return any(s in text for s in settings.stop)

    side, tok.padding_side = tok.padding_side, "left"  # new tokens must line up at the right edge
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        for b in range(0, len(order), settings.batch_size):
            idx = order[b:b + settings.batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            if decoder is None:
                rows = _eager_batch(model, tok, enc, kw)
            else:
                rows = decoder.greedy(enc["input_ids"], enc["attention_mask"], settings.max_new_tokens, end_ids,
                                      stopped if settings.stop else None)
            for ids, i in zip(rows, idx):
                if stats is not None:
                    stats.new_tokens += len(ids)
                out[i] = truncate_at_stop(tok.decode(ids, skip_special_tokens=True), settings.stop)
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
            stats.decode = mode
            if decoder is not None:
                stats.decoder = decoder.stats.as_dict()
    return out
