"""Continuous batching for `codetune serve --max-batch N`: up to N generations decode together in one running
batch, joining when a row is free and leaving when they end, while each still runs export/sampling's
`generate_text` (its own thread, its own sampling, stop strings, streaming and cancellation).

One decode step of a 3B model reads every weight once whatever the batch, so N rows cost about what one
does until the arithmetic catches up; a queue of one-at-a-time requests leaves that on the table. The
generations hand their forward passes to one BatchScheduler thread through a `Steps` object
(`RowSteps`): the prompt's pass runs alone (batch 1, transformers' dynamic cache, as the eager loop's) and
its keys and values are copied into a free row of one transformers StaticCache of N rows x L positions;
each step waits until every live row has handed in its next token, runs one batched one-token forward
and hands each row its logits.

The cache's layout. transformers' StaticCache writes every row at one shared position p (its counter).
A row's prompt and tokens sit in the span [start, p) of its row; keys are stored after rotary, so they
stay valid wherever the span sits as long as the row's queries carry its own position ids and the
attention mask covers exactly its span (ones from `start` on: positions past p are cut by causality and
overwritten before anyone attends to them). A prompt longer than p shifts every live span right first,
and a step at p == L shifts them left (to the longest span) first: `_relayout`, in place, so a captured
graph's buffers stay where they were. Free rows attend only to the key they write at this step (never an
all-masked row, whose softmax is NaN) and their results are dropped.

The one-token step is replayed as a CUDA graph where asked (model/static_cache.capture_step: exact or
fall back, one warning); the graph reads the token, position and mask buffers and the cache's own
counter, which all change in place. Greedy output per request equals the request run alone on the CPU
tests (tests/serve/test_batching.py); unmeasured on a GPU.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from codetune.export.sampling import EagerSteps, max_context
from codetune.model.static_cache import cache_kwarg, graphed_step, head_shape, set_length, static_unsupported
from codetune.model.step_attention import STEP_KERNELS, StepAttention

log = logging.getLogger("codetune.serve")

MAX_BATCH_HELP = ("decode up to N requests together in one running batch (continuous batching: requests join "
                  "and leave it as rows free up); 1 = one request at a time. Its KV cache is allocated once: "
                  "N x --batch-context x layers x 2 x kv_heads x head_dim x 2 bytes in bf16 (stable-code-3b: "
                  "about 0.33 MB per position, so N=8 at 4096 positions is about 11 GB). Unmeasured on a GPU")
BATCH_CONTEXT_HELP = ("positions per row of the running batch's KV cache (default: the model's context); "
                      "with --max-batch above 1, a request's prompt + max_tokens must fit in it")


class BatchClosed(RuntimeError):
    """The scheduler shut down (the server is stopping) while a generation waited on it."""


def check_batching(model, decode: str) -> None:
    """ValueError (naming the fix) where --max-batch above 1 cannot run with this model and --decode."""
    why = static_unsupported(model)
    if why:
        raise ValueError(f"--max-batch above 1 decodes through a static KV cache: {why}; use --max-batch 1")
    if decode == "eager":
        raise ValueError("--max-batch above 1 decodes through a static KV cache, not --decode eager; "
                         "use --decode static, graph or auto, or --max-batch 1")


def cache_bytes(model, rows: int, length: int) -> int:
    """What the running batch's KV cache takes: rows x length x layers x (keys, values) x kv heads x
    head dim x the model's element size (its embeddings' dtype: the activations')."""
    h = head_shape(model)
    return rows * length * h.layers * 2 * h.kv_heads * h.head_dim * model.get_input_embeddings().weight.element_size()


@dataclass
class BatchStats:
    joins: int = 0  # prompts prefilled into a row
    steps: int = 0  # batched one-token steps
    row_steps: int = 0  # live rows summed over the steps (row_steps / steps: the mean batch)
    shifted: int = 0  # live rows moved right to make room for a longer prompt
    compacted: int = 0  # live rows moved left because the shared position reached L
    replays: int = 0  # steps run by a CUDA graph
    captured: int = 0
    fallback: str | None = None  # why graphs were turned off, if they were


@dataclass(eq=False)  # identity: tickets are looked up in lists, and their tensors have no plain ==
class _Ticket:
    """One generation's place in the batch, from its prompt to its leaving. Answers and errors go here,
    not to the row: once it leaves, its row may hold someone else."""
    input_ids: torch.Tensor | None  # (1, n), until it is prefilled
    row: int | None = None  # its row, once admitted
    start: int = 0  # cache index where its span begins
    pos: int = 0  # position id of its next token
    token: int | None = None  # handed in for the next step
    answer: torch.Tensor | None = None  # the logits handed back, (1, vocab)
    error: BaseException | None = None
    admitted: bool = False  # prefilled (or refused: then `error`)


@dataclass
class _Slot:
    """The cache and the step's input buffers (fixed addresses, for a captured graph)."""
    cache: object  # transformers.StaticCache
    token: torch.Tensor  # (N, 1)
    pos: torch.Tensor  # (N, 1) each row's position id
    mask: torch.Tensor  # (N, L) 1 where the row may attend
    graph: object | None = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # the graph's output buffer
    tried: bool = False


@dataclass
class BatchScheduler:
    """One running batch of `rows` rows x `length` positions (default: the model's context) for one model.
    graphs: capture the batched step as a CUDA graph (None: where the model is on CUDA)."""
    model: object
    rows: int
    length: int | None = None
    graphs: bool | None = None
    stats: BatchStats = field(default_factory=BatchStats)
    attention_kernels: tuple[str, ...] = STEP_KERNELS  # model/step_attention.StepAttention

    def __post_init__(self):
        from transformers import StaticCache

        from codetune.model.adapters import causal_lm

        if self.rows < 1:
            raise ValueError(f"max_batch={self.rows}: must be at least 1")
        self.length = self.length or max_context(self.model)
        self.device = self.model.get_input_embeddings().weight.device
        if self.graphs is None:
            self.graphs = self.device.type == "cuda"
        z = dict(dtype=torch.long, device=self.device)
        self._slot = _Slot(StaticCache(config=causal_lm(self.model).config, max_cache_len=self.length),
                           torch.zeros((self.rows, 1), **z), torch.zeros((self.rows, 1), **z),
                           torch.ones((self.rows, self.length), **z))
        self._allocate()
        self._kw = cache_kwarg(self.model)
        self.attention = StepAttention(self.model, self.attention_kernels)
        self._rows: list[_Ticket | None] = [None] * self.rows  # who holds each row
        self._joins: list[_Ticket] = []
        self._p = 0  # the shared write position (the cache's counter, mirrored on the host)
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="codetune-batch", daemon=True)
        self._thread.start()

    def _allocate(self) -> None:
        """The KV cache's memory now, not at the first request: a cache that does not fit beside the model
        is a one-line error before the server listens, naming the fix, instead of a 500 later."""
        from codetune.config import ConfigError

        h = head_shape(self.model)
        dtype = self.model.get_input_embeddings().weight.dtype
        probe = torch.zeros((self.rows, h.kv_heads, 1, h.head_dim), dtype=dtype, device=self.device)
        try:
            for layer in self._slot.cache.layers:
                layer.lazy_initialization(probe, probe)
        except torch.cuda.OutOfMemoryError:
            self._slot = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            gb = cache_bytes(self.model, self.rows, self.length) / 1e9
            raise ConfigError(f"--max-batch {self.rows} x --batch-context {self.length}: the running batch's KV cache "
                              f"({gb:.2g} GB) does not fit in GPU memory beside the model; lower --max-batch or "
                              "--batch-context") from None

    def describe(self) -> str:
        how = "CUDA graphs" if self.graphs else (f"no CUDA graphs: {self.stats.fallback}" if self.stats.fallback
                                                  else "no CUDA graphs")
        gb = cache_bytes(self.model, self.rows, self.length) / 1e9
        return f"continuous batching, {self.rows} rows x {self.length} positions ({gb:.2g} GB KV cache, {how})"

    def decoder(self) -> RowDecoder:
        """What generate_text takes as its `decoder` for one generation in this batch; release() it after."""
        return RowDecoder(self)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # --- the generations' side (their own threads) ---

    def join(self, ticket: _Ticket) -> torch.Tensor:
        """Prefill the ticket's prompt into a free row (waiting for one); the last position's logits."""
        with self._cond:
            self._joins.append(ticket)
            self._cond.notify_all()
            while not ticket.admitted and not self._closed:
                self._cond.wait()
            return self._answer(ticket)

    def step(self, ticket: _Ticket, token: int) -> torch.Tensor:
        with self._cond:
            if ticket.row is None:
                raise RuntimeError("this generation has no row in the batch (it left, or a step failed)")
            ticket.token, ticket.answer = token, None
            self._cond.notify_all()
            while ticket.answer is None and ticket.error is None and not self._closed:
                self._cond.wait()
            return self._answer(ticket)

    def _answer(self, ticket: _Ticket) -> torch.Tensor:
        if ticket.error is not None:
            raise ticket.error
        if ticket.answer is None:
            raise BatchClosed("the server is shutting down")
        return ticket.answer

    def leave(self, ticket: _Ticket) -> None:
        with self._cond:
            self._free(ticket)
            if ticket in self._joins:  # (it gave up before being admitted)
                self._joins.remove(ticket)
            self._cond.notify_all()

    # --- the scheduler's thread ---

    def _free(self, ticket: _Ticket) -> None:
        if ticket.row is not None and self._rows[ticket.row] is ticket:
            self._rows[ticket.row] = None
        ticket.row, ticket.token = None, None

    def _live(self) -> list[_Ticket]:
        return [t for t in self._rows if t is not None]

    def _ready(self) -> bool:
        live = self._live()
        return bool(self._joins and len(live) < self.rows) or bool(live and all(t.token is not None for t in live))

    @torch.inference_mode()
    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._closed and not self._ready():
                    self._cond.wait()
                if self._closed:
                    self._cond.notify_all()
                    return
                # the lock stays held through the forward pass: the generations wait for its answer anyway
                if self._joins and len(self._live()) < self.rows:
                    self._admit(self._joins.pop(0))
                else:
                    self._batched_step()
                self._cond.notify_all()

    def _admit(self, ticket: _Ticket) -> None:
        try:
            steps = EagerSteps(self.model)
            ticket.answer = steps.prefill(ticket.input_ids).clone()
            self._place(ticket, steps.past, ticket.input_ids.shape[1])
            self.stats.joins += 1
        except Exception as e:  # noqa: BLE001 - the error goes to the generation that asked
            ticket.error = e
        ticket.admitted, ticket.input_ids = True, None

    def _place(self, ticket: _Ticket, past, n: int) -> None:
        """Copy a prefilled prompt's keys and values into a free row, ending at the shared position."""
        if n > self.length:
            raise ValueError(f"a {n}-token prompt does not fit the running batch's {self.length} positions "
                             "(--batch-context)")
        layers = self._slot.cache.layers  # (allocated at start-up: _allocate)
        if not self._live():
            self._set_p(n)
        elif n > self._p:
            self._relayout(n)
        row, start = self._rows.index(None), self._p - n
        for layer, src in zip(layers, past.layers):
            layer.keys[row, :, start:self._p].copy_(src.keys[0])
            layer.values[row, :, start:self._p].copy_(src.values[0])
        self._rows[row] = ticket
        ticket.row, ticket.start, ticket.pos, ticket.token = row, start, n, None
        self._mask_row(ticket)

    def _mask_row(self, ticket: _Ticket) -> None:
        mask = self._slot.mask[ticket.row]
        mask.fill_(1)
        mask[:ticket.start] = 0

    def _set_p(self, p: int) -> None:
        set_length(self._slot.cache, p)
        self._p = p

    def _relayout(self, new_p: int) -> None:
        """Move every live row's span so it ends at `new_p`, in place: right for a long prompt, left when p
        reached L."""
        shift = new_p - self._p
        live = self._live()
        if shift > 0 and new_p > self.length or any(t.start + shift < 0 for t in live):
            raise RuntimeError(f"cannot move the running batch's rows to end at {new_p}")
        for layer in self._slot.cache.layers:
            for t in live:
                for buf in (layer.keys, layer.values):
                    # clone: source and target overlap within the row
                    buf[t.row, :, t.start + shift:new_p].copy_(buf[t.row, :, t.start:self._p].clone())
        for t in live:
            t.start += shift
            self._mask_row(t)
        self._set_p(new_p)
        if shift > 0:
            self.stats.shifted += 1
        else:
            self.stats.compacted += 1

    def _batched_step(self) -> None:
        live = self._live()
        slot = self._slot
        try:
            if self._p >= self.length:
                # to the longest span (a row's span is as long as its next position id): below L, as no
                # row steps past its prompt + max_tokens <= L
                self._relayout(max(t.pos for t in live))
            free = [row for row, t in enumerate(self._rows) if t is None]
            if free:
                # a free row's result is dropped; it attends only to the key it writes now: finite, and it
                # costs its mask bytes only where the step's attention reads just the keys a mask keeps
                # (split-KV attention, model/step_attention.py), not a full row of the cache per step
                rows = torch.tensor(free, device=slot.mask.device)
                slot.mask[rows] = 0
                slot.mask[rows, self._p] = 1
            slot.token.copy_(torch.tensor([[0 if t is None else t.token] for t in self._rows]))
            slot.pos.copy_(torch.tensor([[0 if t is None else t.pos] for t in self._rows]))
            logits = self._step()[:, -1, :]
            self._p += 1
            self.stats.steps += 1
            self.stats.row_steps += len(live)
            for t in live:
                t.answer, t.token, t.pos = logits[t.row:t.row + 1].clone(), None, t.pos + 1
        except Exception as e:  # noqa: BLE001 - every row in the step gets it; the cache is not trusted after
            log.exception("codetune serve: a batched decode step failed")
            for t in live:
                t.error = e
                self._free(t)
            self._set_p(self._p)  # the counter back to the host's, whether or not the forward moved it

    def _forward(self, slot: _Slot, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with self.attention():
            out = self.model(input_ids=token, attention_mask=slot.mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self._kw: slot.cache})
        return out.logits

    def _step(self) -> torch.Tensor:
        slot = self._slot
        if not self.graphs:
            return self._forward(slot, slot.token, slot.pos)
        logits, off = graphed_step(slot, self.stats, lambda: self._forward(slot, slot.token, slot.pos), self.device)
        if off:
            self.graphs, self.stats.fallback = False, off
            log.warning("codetune serve: CUDA graphs off, the running batch decodes with the static KV cache "
                        "alone: %s", off)
        return logits


class RowDecoder:
    """A Decoder for generate_text (it calls `steps`) whose passes run in a BatchScheduler's batch; one
    generation each. `release()` frees its row (the generation ended, was cancelled, or failed)."""

    def __init__(self, scheduler: BatchScheduler):
        self.scheduler, self.ticket = scheduler, None

    def steps(self, prompt_len: int, max_new_tokens: int) -> RowDecoder:
        if prompt_len + max_new_tokens > self.scheduler.length:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_new_tokens}) passes the running "
                             f"batch's {self.scheduler.length} positions (--batch-context)")
        return self

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ticket is not None:
            raise RuntimeError("a RowDecoder runs one generation")
        self.ticket = _Ticket(input_ids)
        return self.scheduler.join(self.ticket)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(self.ticket, int(token))

    def release(self) -> None:
        if self.ticket is not None:
            self.scheduler.leave(self.ticket)
