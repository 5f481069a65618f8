"""Decoding through a preallocated (static) KV cache, with the one-token step replayed as a CUDA graph.

Single-stream decoding is bound by launching kernels, not by arithmetic: a 3B model's forward pass for
one token is hundreds of small kernels, and with transformers' dynamic cache every step also grows each
layer's keys and values by concatenation. Here the keys and values live in transformers' StaticCache,
sized once for a bucket of lengths (prompt + max_new_tokens, rounded up to a power of two), and the
model's own forward writes into it in place; the one-token step then has the same shapes and the same
tensor addresses every time, which is what a CUDA graph needs. The position lives on the device (the
cache's own counter), so one graph serves every step of every request in its bucket.

Exact or fall back: the first replay of each captured graph is compared with the eager step it replaces
(same cache state, same token); logits that differ in any bit, or a capture that fails, log one warning
and the decoder runs the static cache without graphs from then on. Greedy ids equal the eager loop's
(tests/export/test_static_decode.py checks that on the CPU; bench/decode_bench.py on the GPU).

A Decoder keeps its caches and graphs between calls (serve holds one for its lifetime) and runs one
generation at a time: starting another generation ends the previous one's steps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from codetune.export.sampling import EagerSteps, max_context
from codetune.model.static_cache import cache_kwarg, graphed_step, set_length, static_unsupported
from codetune.model.step_attention import STEP_KERNELS, StepAttention, validate_kernels

log = logging.getLogger("codetune.decode")

DECODE_MODES = ("auto", "eager", "static", "graph", "compiled")
DECODE_HELP = ("how tokens are decoded: static (preallocated KV cache), graph (static + the one-token step "
               "replayed as a CUDA graph; CUDA only), compiled (graph with the step compiled by torch.compile "
               "first, fusing its small kernels; each cache size compiles once, which takes a while; "
               "experimental), eager (transformers' growing cache, the reference), "
               "auto (static on the CPU; eager on CUDA until a trained checkpoint has shown graph's text is eager's, and "
               "wherever a static cache does not apply)")
# for a stage module's CLI_FLAGS: `codetune generate` and `codetune serve` take the same flag
DECODE_FLAG = (("--decode",), dict(choices=DECODE_MODES, default="auto", help=DECODE_HELP))

MIN_BUCKET = 256  # below this a smaller cache saves nothing worth a separate graph
MIN_REUSE = 32  # shortest shared prefix worth keeping in the cache (reuse_prefix)
MAX_SLOTS = 2  # buckets kept at once (each holds a full KV cache of its length, and its graph)


def bucket_len(needed: int, context: int) -> int:
    """The cache length for `needed` positions: the next power of two (at least MIN_BUCKET), at most the
    model's context."""
    n = MIN_BUCKET
    while n < needed:
        n *= 2
    return min(n, max(context, needed))


def resolve_mode(mode: str, model) -> str:
    """The mode that will run: `auto` resolved for this model and device. ValueError (naming the fix) for
    a mode that cannot run here."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode={mode!r}: choose one of {', '.join(DECODE_MODES)}")
    device = model.get_input_embeddings().weight.device
    why = static_unsupported(model) if mode != "eager" else None
    if mode == "auto":
        # On CUDA auto stays on the eager loop: the graphed path pays (bench/results/decode_h200_2026-12-01_s7.md)
        # but on random weights its greedy ids part from the eager loop's at near-ties, so the same text is
        # still to be shown on a trained checkpoint (issue 17); --decode graph or static choose it meanwhile.
        return "eager" if why or device.type == "cuda" else "static"
    if why:
        raise ValueError(f"--decode {mode}: {why}; use --decode eager")
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"--decode graph needs a CUDA device (the model is on {device.type}); use --decode static")
    return mode  # (compiled runs on the CPU too, without graphs: the tests' way in)


@dataclass
class DecodeStats:
    captured: int = 0  # graphs captured and found exact
    replays: int = 0  # steps run by a graph
    eager_steps: int = 0  # one-token steps run without a graph (static cache)
    fallback: str | None = None  # why graphs were turned off, if they were
    compile_fallback: str | None = None  # why mode compiled runs uncompiled, if it does
    reused_tokens: int = 0  # prompt tokens whose keys and values came from the previous generation (reuse_prefix)


@dataclass
class _Slot:
    """One bucket: its cache, the step's input buffer and, once captured, its graph and output."""
    cache: object  # transformers.StaticCache
    token: torch.Tensor  # (1, 1): the one-token step reads its input here
    graph: object | None = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # the graph's output buffer
    tried: bool = False  # capture attempted (once per slot)
    ids: list[int] = field(default_factory=list)  # whose keys and values the cache holds, from position 0


class Decoder:
    """Runs generations' forward passes for one model, as `mode` says (see DECODE_MODES; `auto` is
    resolved here, a mode that cannot run is a ValueError); holds the static caches and graphs for reuse
    across calls."""

    def __init__(self, model, mode: str = "auto", step_kernels: tuple[str, ...] = STEP_KERNELS,
                 reuse_prefix: bool = False):
        """`step_kernels`: the attention block's kernels of the static-cache passes (model/step_attention; the
        default is what generate and serve run, another set is bench/decode_bench.py's A/B). `reuse_prefix`:
        a prompt that starts with what the slot's cache holds (the previous prompt and its completion, at
        least MIN_REUSE tokens of it) reads only the rest: an editor's requests as you type share the
        file's text before the cursor. The kept keys and values were computed in another pass, so the
        logits equal a full prefill's to rounding, not bit for bit (serve --reuse-prefix, opt-in)."""
        self.model, self.mode, self.stats = model, resolve_mode(mode, model), DecodeStats()
        self.reuse_prefix = reuse_prefix
        validate_kernels(step_kernels)  # (a bad set is refused in every mode, not at the first step)
        # (the split kernel is checked where a static cache runs, not for the eager loop, which never uses it)
        self.attention = StepAttention(model, step_kernels) if self.mode != "eager" else None
        if reuse_prefix and self.mode == "eager":
            raise ValueError("reusing a prompt prefix needs the static KV cache; use --decode static or graph")
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._generation = 0
        on_cuda = model.get_input_embeddings().weight.device.type == "cuda"
        self._graphs = self.mode == "graph" or (self.mode == "compiled" and on_cuda)
        self._compiled = None  # the compiled one-token step, made at its first use (mode compiled)

    def describe(self) -> str:
        reuse = ", reusing prompt prefixes" if self.reuse_prefix else ""
        kernels = self.attention.describe() if self.attention else ""
        attention = f", {kernels}" if kernels else ""
        return self._describe() + attention + reuse

    def _describe(self) -> str:
        if self.mode == "eager":
            return "eager (dynamic KV cache)"
        if self.mode == "compiled" and self.stats.compile_fallback is None:
            return "static KV cache, torch.compile'd step" + (" + CUDA graphs" if self._graphs else "")
        if self._graphs:
            return "static KV cache + CUDA graphs"
        return f"static KV cache (CUDA graphs off: {self.stats.fallback})" if self.stats.fallback else "static KV cache"

    def steps(self, prompt_len: int, max_new_tokens: int):
        """The forward passes of one generation (see sampling.Steps)."""
        if self.mode == "eager":
            return EagerSteps(self.model)
        self._generation += 1
        return _StaticSteps(self, self._slot(prompt_len + max_new_tokens), self._generation)

    def _slot(self, needed: int) -> _Slot:
        from transformers import StaticCache

        from codetune.model.adapters import causal_lm

        length = bucket_len(needed, max_context(self.model))
        if length in self._slots:
            self._slots.move_to_end(length)
            return self._slots[length]
        while len(self._slots) >= MAX_SLOTS:
            self._slots.popitem(last=False)  # its cache and graph memory go back to the allocator
        device = self.model.get_input_embeddings().weight.device
        config = causal_lm(self.model).config
        slot = _Slot(StaticCache(config=config, max_cache_len=length),
                     torch.zeros((1, 1), dtype=torch.long, device=device))
        self._slots[length] = slot
        return slot

    def _forward(self, slot: _Slot, x: torch.Tensor) -> torch.Tensor:
        with self.attention():  # (outside the compiled function: the compiler sees the kernel it selects)
            if self.mode == "compiled" and x.shape[1] == 1 and self.stats.compile_fallback is None:
                return self._compiled_step(slot, x)
            return self._eager_forward(slot.cache, x)

    def _eager_forward(self, cache, x: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): cache})
        return out.logits

    def _compiled_step(self, slot: _Slot, x: torch.Tensor) -> torch.Tensor:
        """The one-token step through torch.compile (the prompt's pass stays eager: its length varies). A
        compile that fails turns compiling off for good, with one warning, and the step runs uncompiled;
        each cache size is one compiled shape (dynamic=False)."""
        if self._compiled is None:
            self._compiled = torch.compile(self._eager_forward, dynamic=False)
        try:
            return self._compiled(slot.cache, x)
        except Exception as e:  # noqa: BLE001 - the compiler's failures are many; the uncompiled step is exact
            first = (str(e).splitlines() or [""])[0][:200]
            self.stats.compile_fallback = f"{type(e).__name__}: {first}"
            # seen on an H200: a compile killed midway leaves a truncated .so in the cache ("file too short"),
            # and every later compile of that step fails on it until the cache is cleared
            hint = (" (a damaged compile cache: remove torch's inductor cache folder or point TORCHINDUCTOR_CACHE_DIR "
                    "at an empty one)" if "file too short" in first or "ImportError" in first else "")
            log.warning("codetune: torch.compile of the decode step failed (%s); decoding uncompiled%s",
                        self.stats.compile_fallback, hint)
            return self._eager_forward(slot.cache, x)

    def _graph_off(self, why: str) -> None:
        self._graphs, self.stats.fallback = False, why
        log.warning("codetune: CUDA graphs off, decoding with the static KV cache alone: %s", why)


class _StaticSteps:
    """One generation's passes through a slot; refuses to run once a later generation has started (the
    slot's cache is shared)."""

    def __init__(self, decoder: Decoder, slot: _Slot, generation: int):
        self.d, self.slot, self.generation = decoder, slot, generation

    def _check(self) -> None:
        if self.d._generation != self.generation:
            raise RuntimeError("a Decoder runs one generation at a time; this one was superseded")

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check()
        slot = self.slot
        ids = input_ids[0].tolist() if self.d.reuse_prefix else []  # (read back only where it is kept)
        keep = self._reusable(ids) if ids else 0
        slot.ids = []  # (until this pass has run: a failed one leaves nothing to reuse)
        if keep:
            set_length(slot.cache, keep)
            self.d.stats.reused_tokens += keep
            logits = self.d._forward(slot, input_ids[:, keep:])
        else:
            slot.cache.reset()  # zeroed in place: the graph keeps pointing at the same buffers
            logits = self.d._forward(slot, input_ids)
        slot.ids = ids
        return logits[:, -1, :]

    def _reusable(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the slot's cache already holds (0 below MIN_REUSE); at least one
        token is left to read, for its logits."""
        n = 0
        for a, b in zip(self.slot.ids, ids[:-1]):
            if a != b:
                break
            n += 1
        return n if n >= MIN_REUSE else 0

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self._check()
        logits = self._step(token)
        if self.d.reuse_prefix:  # its keys and values are in the cache now (generate_ids has read the id)
            self.slot.ids.append(int(token))
        return logits

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        slot, d = self.slot, self.d
        slot.token.copy_(token.view(1, 1))
        if d._graphs:  # replay the slot's graph, or capture it (once: a failed capture turns graphs off)
            logits, off = graphed_step(slot, d.stats, lambda: d._forward(slot, slot.token), slot.token.device)
            if off:
                d._graph_off(off)
            return logits[:, -1, :]
        d.stats.eager_steps += 1
        return d._forward(slot, slot.token)[:, -1, :]
