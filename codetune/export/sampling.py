"""Token-by-token decoding with the KV cache, shared by `codetune generate`, `codetune serve` and the demo.

A loop of our own rather than `model.generate` because both callers need three things at once: text
streamed as it is produced, stop strings cut out of that stream (text that might be the start of a stop
string is held back until it is known not to be), and cancellation when an HTTP client goes away. The
logits processing itself is transformers' (temperature, top-k, top-p, repetition penalty).

How each token's logits are computed is a `Steps` object: the eager loop here (transformers' dynamic
cache, which grows by concatenation every token), or static_decode's preallocated KV cache, whose one-token
step has fixed shapes and can be replayed as a CUDA graph. The token choice is the same code for both, so
the paths differ only in how the forward pass runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from codetune import registry
from codetune.model.static_cache import cache_kwarg

if TYPE_CHECKING:
    from codetune.export.static_decode import Decoder


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # tokens that end the completion as EOS does, and like it are not returned: a chat template's
    # end-of-turn token (<|im_end|>) where it is not EOS
    stop_token_ids: tuple[int, ...] = ()
    # an editor's latency bound (llama.cpp's t_max_predict_ms): once this many seconds have passed since
    # the first token and the text holds a line break, stop (finish "length") with what is there
    line_time_limit_s: float | None = None

    def check(self) -> None:
        """Raise ValueError naming the bad setting (the CLI and the server turn it into their own error)."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be 0 (greedy) or positive")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be 0 (off) or positive")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be positive (1 = off)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.line_time_limit_s is not None and not self.line_time_limit_s > 0:
            raise ValueError(f"line_time_limit_s={self.line_time_limit_s}: must be positive")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens) or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    prefill_s: float = 0.0  # from the call to the first token (the prompt's forward pass)
    decode_s: float = 0.0  # from the first token to the end
    stop_word: str = ""  # the stop string that ended the text, if one did


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    # Special-token strings in a plain prompt are kept as tokens: editors send hand-built FIM prompts.
    return tokenizer.encode(prompt, add_special_tokens=False)


def fim_ids(tokenizer, prefix: str, suffix: str) -> list[int]:
    """`<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` (PSM order, as in training); the model then
    writes the middle and ends it with EOS."""
    return fim_layout(tokenizer, prompt_ids(tokenizer, prefix), prompt_ids(tokenizer, suffix))


def fim_layout(tokenizer, prefix: list[int], suffix: list[int]) -> list[int]:
    """The FIM prompt around an already tokenized prefix and suffix (for callers that trim them to fit), in
    the FIM tokens of the model family the tokenizer belongs to (registry.tokens_in)."""
    pre, suf, mid = (tokenizer.convert_tokens_to_ids(t) for t in registry.tokens_in(tokenizer).fim())
    return [pre] + list(prefix) + [suf] + list(suffix) + [mid]


def max_context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def _processors(params: SamplingParams):
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            procs.append(TopPLogitsWarper(params.top_p))
    return procs


class Steps(Protocol):
    """One generation's forward passes: the prompt's, then one token at a time. Each returns the last
    position's logits, shape (1, vocab), valid until the next call."""

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def step(self, token: torch.Tensor) -> torch.Tensor: ...


class EagerSteps:
    """transformers' dynamic cache: the reference path, and what runs where a static cache cannot."""

    def __init__(self, model):
        self.model, self.cache_kw, self.past = model, cache_kwarg(model), None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.past})
        self.past = getattr(out, self.cache_kw)
        return out.logits[:, -1, :]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._forward(input_ids)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self._forward(token)


@torch.inference_mode()
def generate_ids(model, input_ids: list[int], params: SamplingParams, vocab_limit: int,
                 stop_ids: set[int], decoder: Decoder | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, ending after a token in `stop_ids` or max_new_tokens. Ids at or
    past `vocab_limit` (embedding padding rows with no token) are never sampled. `decoder`
    (static_decode.Decoder) runs the forward passes; None: the eager loop."""
    device = model.get_input_embeddings().weight.device
    x = torch.tensor([input_ids], dtype=torch.long, device=device)
    seen = x
    procs = _processors(params)
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    steps = EagerSteps(model) if decoder is None else decoder.steps(len(input_ids), params.max_new_tokens)
    logits = steps.prefill(x)
    for i in range(params.max_new_tokens):
        # a copy: a graphed step's output buffer is overwritten by the next replay
        logits = logits.to(torch.float32, copy=True)
        logits[:, vocab_limit:] = float("-inf")
        logits = procs(seen, logits)
        if params.temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        tok = int(nxt)
        yield tok
        if tok in stop_ids or i + 1 == params.max_new_tokens:
            return
        nxt = nxt.view(1, 1)
        seen = torch.cat([seen, nxt], dim=1)
        logits = steps.step(nxt)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class _Detokenizer:
    """Incremental decoding: each new token's text, found by decoding a short window of recent ids (so
    the cost per token stays flat, not growing with the completion). A token that ends mid-way through
    a multi-byte character yields nothing until the character is complete."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def rest(self) -> str:
        """Whatever is left undecoded at the end (an incomplete character shows as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        return self._decode(self.ids[self.prefix:])[len(before):]


def generate_text(model, tokenizer, input_ids: list[int], params: SamplingParams,
                  on_text: Callable[[str], None] | None = None,
                  cancelled: Callable[[], bool] | None = None, decoder: Decoder | None = None) -> Completion:
    """Generate from `input_ids`; stream text pieces to `on_text`; stop at EOS or a stop token, a stop
    string (neither included) or max_new_tokens; `cancelled()` is polled each token. `decoder`: as for
    generate_ids."""
    params.check()
    t0 = time.perf_counter()
    first = None
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos |= set(params.stop_token_ids)
    vocab_limit = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    longest_stop = max((len(s) for s in params.stop), default=0)
    detok = _Detokenizer(tokenizer)
    text, emitted, finish, n_tokens, cut, stop_word = "", 0, "length", 0, False, ""
    for tok in generate_ids(model, input_ids, params, vocab_limit, eos, decoder):
        n_tokens += 1
        if first is None:
            first = time.perf_counter()
        if tok in eos:
            finish = "stop"
            break
        piece = detok.add(tok)
        if piece:
            # a stop string can only end in the new piece: search from just before it
            start = max(0, len(text) - longest_stop + 1)
            text += piece
            hits = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                at = min(hits)
                stop_word = next(s for s in params.stop if text.find(s, start) == at)
                text, finish, cut = text[:at], "stop", True
                break
            safe = len(text) - _held_back(text, params.stop)
            if on_text is not None and safe > emitted:
                on_text(text[emitted:safe])
                emitted = safe
        if cancelled is not None and cancelled():
            finish = "cancelled"
            break
        if (params.line_time_limit_s is not None and "\n" in text
                and time.perf_counter() - first > params.line_time_limit_s):
            break  # finish stays "length": a bound on the completion, as max_new_tokens is
    if not cut:
        text += detok.rest()
    if on_text is not None and len(text) > emitted:
        on_text(text[emitted:])
    end = time.perf_counter()
    first = end if first is None else first
    return Completion(text, finish, len(input_ids), n_tokens, prefill_s=first - t0, decode_s=end - first,
                      stop_word=stop_word)
