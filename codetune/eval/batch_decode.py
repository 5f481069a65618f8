"""Greedy decoding of a batch of prompts through a static KV cache, for evaluation's throughput.

`generate` with transformers' dynamic cache spends a decode step mostly outside the arithmetic: every
layer's keys and values grow by concatenation, the 2D attention mask grows and is rebuilt into a 4D mask,
the stop-string criterion runs, and the loop reads a flag back from the GPU to know whether to go on, so
the host waits for the device every token. Here one batch (left-padded, as `generate` gets it) runs
through a transformers StaticCache sized once for the batch: the one-token step has fixed shapes and
reads fixed buffers (the tokens, each row's position, the padding mask over the whole cache), so on CUDA
it is replayed as a CUDA graph (model/static_cache.capture_step: the first replay must equal the eager step
bit for bit, else the static cache runs without graphs). The next token is chosen on the device; the
host looks at the generated ids only every `check_every` steps, to cut rows at a stop string, and the
batch ends once every row has ended (EOS, pad or a stop string) or the budget is spent.

Greedy ids per row equal `generate`'s for the same batch: the same left padding, the same position ids
(the padding mask's running count), the same argmax over float32 logits; only the cache's storage
differs (tests/eval/test_batch_decode.py). A row's finished tail is computed and thrown away as in
`generate`; filling finished rows with waiting prompts needs per-row cache positions, which transformers'
StaticCache does not have (one write position for the whole batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from codetune.model.static_cache import cache_kwarg, graphed_step, static_unsupported
from codetune.model.step_attention import STEP_KERNELS, StepAttention

log = logging.getLogger("codetune.eval")

CACHE_ROUND = 128  # cache lengths are rounded up to this, so batches of similar length share a cache and graph


@dataclass
class BatchStats:
    batches: int = 0
    steps: int = 0  # one-token steps (each for the whole batch)
    replays: int = 0  # of those, run by a CUDA graph
    host_checks: int = 0  # times the host read the generated ids back
    captured: int = 0  # graphs captured and found exact
    fallback: str | None = None  # why graphs were turned off, if they were

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class _Slot:
    """One cache and the step's input buffers, for one (batch size, cache length)."""
    cache: object  # transformers.StaticCache
    token: torch.Tensor  # (B, 1) the step's input tokens
    pos: torch.Tensor  # (B, 1) each row's position id
    mask: torch.Tensor  # (B, cache_len) 1 = a real token or a position still to come, 0 = left padding
    graph: object | None = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # the graph's output buffer
    tried: bool = False


@dataclass
class BatchDecoder:
    """Greedy batch decoding for one model; keeps the last batch shape's cache and graph for the next
    batch of the same shape. graphs: None = on CUDA."""
    model: object
    graphs: bool | None = None
    check_every: int = 8
    stats: BatchStats = field(default_factory=BatchStats)
    attention_kernels: tuple[str, ...] = STEP_KERNELS  # model/step_attention.StepAttention

    def __post_init__(self):
        why = static_unsupported(self.model)
        if why:
            raise ValueError(f"batched decoding: {why}; use --eval-decode eager")
        self.device = self.model.get_input_embeddings().weight.device
        if self.graphs is None:
            self.graphs = self.device.type == "cuda"
        self._slot_key: tuple[int, int] | None = None
        self._slot_val: _Slot | None = None
        self._kw = cache_kwarg(self.model)
        self.attention = StepAttention(self.model, self.attention_kernels)

    def _slot(self, batch: int, length: int) -> _Slot:
        from transformers import StaticCache

        from codetune.model.adapters import causal_lm

        if self._slot_key == (batch, length):
            self._slot_val.cache.reset()  # zeroed in place: a captured graph keeps pointing at the same buffers
            return self._slot_val
        self._slot_val = None  # the old cache and graph go back to the allocator before the new one is made
        z = dict(dtype=torch.long, device=self.device)
        slot = _Slot(StaticCache(config=causal_lm(self.model).config, max_cache_len=length),
                     torch.zeros((batch, 1), **z), torch.zeros((batch, 1), **z), torch.ones((batch, length), **z))
        self._slot_key, self._slot_val = (batch, length), slot
        return slot

    def _forward(self, slot: _Slot, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with self.attention():
            out = self.model(input_ids=input_ids, attention_mask=slot.mask, position_ids=position_ids,
                             use_cache=True, logits_to_keep=1, **{self._kw: slot.cache})
        return out.logits

    def _step(self, slot: _Slot) -> torch.Tensor:
        self.stats.steps += 1
        if not self.graphs:
            return self._forward(slot, slot.token, slot.pos)
        logits, off = graphed_step(slot, self.stats, lambda: self._forward(slot, slot.token, slot.pos), self.device)
        if off:
            self.graphs, self.stats.fallback = False, off
            log.warning("codetune eval: CUDA graphs off, decoding with the static KV cache alone: %s", off)
        return logits

    @torch.inference_mode()
    def greedy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
               end_ids: list[int], ended: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """New ids per row of a left-padded batch, each ending at its first id in `end_ids` (included)
        or at max_new_tokens. `ended(row, ids)` is asked every check_every steps for rows still running
        (ids so far) and True ends the row there; ids past that point may follow (the caller cuts)."""
        batch, length = input_ids.shape
        cache_len = -(-(length + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
        slot = self._slot(batch, cache_len)
        self.stats.batches += 1
        mask = attention_mask.to(device=self.device, dtype=torch.long)
        slot.mask.fill_(1)
        slot.mask[:, :length] = mask
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as `generate` numbers left-padded rows
        logits = self._forward(slot, input_ids.to(self.device), pos)
        stop = torch.tensor(sorted(set(end_ids)), dtype=torch.long, device=self.device)
        out = torch.empty((batch, max_new_tokens), dtype=torch.long, device=self.device)
        nxt = logits[:, -1, :].float().argmax(-1)
        out[:, 0] = nxt
        done = torch.isin(nxt, stop)
        slot.pos.copy_(pos[:, -1:] + 1)
        running = set(range(batch))
        steps = max_new_tokens
        for t in range(1, max_new_tokens):
            if t % self.check_every == 0:
                running = self._still_running(running, done, out[:, :t], ended)
                if not running:
                    steps = t
                    break
            slot.token.copy_(nxt.view(batch, 1))
            nxt = self._step(slot)[:, -1, :].float().argmax(-1)
            out[:, t] = nxt
            done |= torch.isin(nxt, stop)
            slot.pos.add_(1)
        rows = out[:, :steps].tolist()
        ends = set(end_ids)
        return [row[:next((i + 1 for i, x in enumerate(row) if x in ends), len(row))] for row in rows]

    def _still_running(self, running: set[int], done: torch.Tensor, so_far: torch.Tensor,
                       ended: Callable[[int, list[int]], bool] | None) -> set[int]:
        self.stats.host_checks += 1
        done_rows = done.tolist()  # the one device-to-host wait per check_every steps
        left = {r for r in running if not done_rows[r]}
        if ended is not None and left:
            ids = so_far.tolist()
            left = {r for r in left if not ended(r, ids[r])}
        return left
