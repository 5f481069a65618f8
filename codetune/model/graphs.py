"""CUDA graphs of each decoder layer's training passes: the no-grad forward, and the recomputed forward
plus backward of a checkpointed layer — captured once per input shape, replayed every step.

Why: measured on an H200 (bench/results/raw/s3a_profile_*): a 2k-token step was ~100 ms of GPU work in a
~310 ms step, a 4k step ~190 ms in ~260 ms. The rest was the CPU issuing ~3,000 kernel launches and the
Python around them. A replay issues one layer's whole pass at once.

How it stays exact (tests/gpu compare losses and gradients with the eager path):
- capture runs the same Python as eager mode (model/fast_layer.py); a replay re-runs exactly the captured
  kernels, reading inputs from static buffers each call fills (hidden states, incoming gradient, cos/sin,
  masks: copied only when they are different tensors than last time) and writing outputs to static
  buffers that are cloned out;
- adapters are cast from their fp32 parameters inside the graph (lora_fast.Projections bypasses its cache
  while capturing), so every replay sees the optimizer's latest in-place update;
- parameter gradients accumulate inside the graph into one persistent .grad tensor per trainable
  parameter (autograd adds in place into an existing .grad); after `zero_grad(set_to_none=True)` those
  buffers are zeroed and put back before the layer's first backward of the next step;
- every graph frees its intermediates before its capture ends, so all graphs share one memory pool whose
  size is about one layer's working set. (`torch.cuda.graph` empties the allocator's cache before each
  capture, so what the eager warm-up pass cached is given back rather than kept beside the pool.)

Where it is not exact, it is not used: CPU, the fused layer not active, dropout (random numbers), autocast
(fp16 GPUs), several processes (DDP/FSDP hook into gradient accumulation, which a graph bypasses). The
first call of each pass runs eagerly (it compiles Triton kernels and picks cuBLAS/cuDNN plans); the second
captures. A failed capture turns graphs off for the run, says why once, and trains eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from codetune.config import CUDA_GRAPHS_AUTO_MAX_TOKENS as AUTO_MAX_TOKENS  # (why 4096: see there)

log = logging.getLogger(__name__)


def graphs_for(mode: str, tokens: int) -> bool:
    """Do micro-batches of `tokens` tokens run as CUDA graphs under --cuda-graphs `mode`? The one rule, asked
    by the bank at run time, by the trainer (which then keeps the batch's shapes static) and by the planner."""
    return mode == "on" or (mode == "auto" and tokens <= AUTO_MAX_TOKENS)


def _tensor_seq(v) -> bool:
    """A non-empty tuple/list of tensors (position_embeddings = (cos, sin))."""
    return isinstance(v, (tuple, list)) and bool(v) and all(isinstance(t, torch.Tensor) for t in v)


def _flatten(kwargs: dict):
    """(signature, tensors) of a layer call's keyword arguments, or None when a value can't be keyed."""
    sig, tensors = [], []
    for name in sorted(kwargs):
        v = kwargs[name]
        if isinstance(v, torch.Tensor):
            sig.append((name, tuple(v.shape), v.dtype, v.device))
            tensors.append(v)
        elif _tensor_seq(v):
            sig.append((name, tuple((tuple(t.shape), t.dtype, t.device) for t in v)))
            tensors.extend(v)
        elif v is None or isinstance(v, (bool, int, float, str)):
            sig.append((name, v))
        else:
            return None
    return tuple(sig), tensors


def _rebuild(kwargs: dict, statics: list[torch.Tensor]) -> dict:
    """kwargs with each tensor replaced by its static buffer (same order as _flatten)."""
    out, it = {}, iter(statics)
    for name in sorted(kwargs):
        v = kwargs[name]
        if isinstance(v, torch.Tensor):
            out[name] = next(it)
        elif _tensor_seq(v):
            out[name] = type(v)(next(it) for _ in v)
        else:
            out[name] = v
    return out


@dataclass
class _Statics:
    """Buffers shared by every layer's graphs of one signature (layers run one at a time)."""
    x: torch.Tensor        # layer input
    y: torch.Tensor        # forward output; in backward, the incoming gradient
    gx: torch.Tensor       # gradient w.r.t. the input
    kw: list               # static copies of the keyword tensors
    loaded: list = field(default_factory=list)  # the source tensors kw holds now (kept alive: compared by identity)

    def load_kwargs(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) == len(self.loaded) and all(a is b for a, b in zip(tensors, self.loaded)):
            return
        for dst, src in zip(self.kw, tensors):
            dst.copy_(src)
        self.loaded = list(tensors)


class GraphBank:
    """What all graphs of one model share: the memory pool, the static buffers, the on/off state.

    Graphs of one micro-batch shape at a time: a new shape (another --seq-len, a benchmark sweep) drops
    every graph and the pool before capturing again, so memory never holds two shapes' working sets."""

    def __init__(self, mode: str = "auto"):
        self.mode = mode
        self.pool = torch.cuda.graph_pool_handle()
        self.statics: dict = {}
        self.streams: dict = {}           # residual-stream buffers per (shape, dtype), shared by all signatures
        self.enabled = True
        self.failure: str | None = None
        self.captured = 0
        self.shape: tuple | None = None   # (batch, seq) of the current micro-batches
        self.active = False               # are they graphed (mode, AUTO_MAX_TOKENS)?
        self.generation = 0               # bumped when they are dropped
        self.calls: dict = {}             # GraphedCall per key
        self.holders: list = []           # everything holding graphs: cleared on a new shape

    def graphed(self, tokens: int) -> bool:
        """Will micro-batches of `tokens` tokens be graphed (while graphs are still on for this run)?"""
        return self.enabled and graphs_for(self.mode, tokens)

    def call(self, key, fn) -> GraphedCall:
        """The GraphedCall of fn under `key` (made on first use; fn must depend only on what key names)."""
        c = self.calls.get(key)
        if c is None:
            c = self.calls[key] = GraphedCall(self, fn)
        return c

    def usable(self, hidden: torch.Tensor) -> bool:
        """May a layer pass on this input be graphed? A new micro-batch shape, graphed or not, first
        drops the old shape's graphs (measured: a 4k pool left behind cost the 8k run 0.9 GiB)."""
        if not (self.enabled and hidden.is_cuda) or torch.is_autocast_enabled("cuda"):
            return False
        shape = tuple(hidden.shape[:2])
        if shape != self.shape:
            self._drop()
            self.shape = shape
            self.active = graphs_for(self.mode, shape[0] * shape[1])
        return self.active

    def _drop(self) -> None:
        if self.shape is None:
            return
        self.generation += 1
        for holder in self.holders:
            holder.clear()
        self.statics.clear()
        self.streams.clear()
        self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the old pool's memory goes back once no graph holds it

    def statics_for(self, sig, hidden: torch.Tensor, tensors: list[torch.Tensor]) -> _Statics:
        """Static buffers of one call signature. The three residual-stream buffers are shared by every
        signature of the same hidden shape (layers run one at a time, and each replay's output is cloned out
        before the next): batches whose keyword tensors differ in shape (packed-document spans with more
        slots) cost a capture, not another 6 x tokens x hidden bytes."""
        s = self.statics.get(sig)
        if s is None:
            key = (tuple(hidden.shape), hidden.dtype, hidden.device)
            stream = self.streams.get(key)
            if stream is None:
                stream = self.streams[key] = tuple(torch.empty_like(hidden) for _ in range(3))
            s = _Statics(*stream, [torch.empty_like(t) for t in tensors])
            self.statics[sig] = s
        return s

    def fail(self, what: str, err: BaseException) -> None:
        self.enabled = False
        self.failure = f"{what}: {type(err).__name__}: {err}"
        log.warning("CUDA graphs off for this run (%s); training continues eagerly", self.failure)


class GraphedLayer:
    """One layer's two graphs for one input signature. `forward`/`backward` return None when the caller
    must run the pass eagerly this time (warm-up call, or graphs turned off)."""

    def __init__(self, bank: GraphBank, statics: _Statics, fn, params: list[torch.nn.Parameter]):
        self.bank, self.s, self.fn, self.params = bank, statics, fn, params
        self.fwd = self.bwd = None
        self.calls = [0, 0]
        self.grads: list[torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor, kw_tensors: list[torch.Tensor]) -> torch.Tensor | None:
        self.calls[0] += 1
        if self.fwd is None:
            if self.calls[0] < 2 or not self.bank.enabled:
                return None
            self.s.load_kwargs(kw_tensors)
            self.fwd = self._capture(self._forward_body, "forward")
            if self.fwd is None:
                return None
        self.s.load_kwargs(kw_tensors)
        self.s.x.copy_(hidden)
        self.fwd.replay()
        return self.s.y.clone()

    def backward(self, hidden: torch.Tensor, grad: torch.Tensor, kw_tensors: list[torch.Tensor]) -> torch.Tensor | None:
        self.calls[1] += 1
        if self.bwd is None:
            if self.calls[1] < 2 or not self.bank.enabled:
                return None
            self._attach_grads()
            self.s.load_kwargs(kw_tensors)
            self.bwd = self._capture(self._backward_body, "backward")
            if self.bwd is None:
                return None
        self._attach_grads()
        self.s.load_kwargs(kw_tensors)
        self.s.x.copy_(hidden)
        self.s.y.copy_(grad)
        self.bwd.replay()
        return self.s.gx.clone()

    def _forward_body(self) -> None:
        with torch.no_grad():
            self.s.y.copy_(self.fn(self.s.x))

    def _backward_body(self) -> None:
        x = self.s.x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.fn(x, grad_only=True)  # (only back-propagated through: its values are unused)
        torch.autograd.backward(out, self.s.y, inputs=[x] + self.params)
        self.s.gx.copy_(x.grad)

    def _capture(self, body, what: str):
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=self.bank.pool):
                body()
        except Exception as e:  # noqa: BLE001 - any capture problem: eager from now on
            self.bank.fail(f"capturing a layer's {what}", e)
            return None
        self.bank.captured += 1
        return g

    def _attach_grads(self) -> None:
        """Make each trainable parameter's .grad the persistent buffer the graph accumulates into."""
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        stale = [g for p, g in zip(self.params, self.grads) if p.grad is None]
        if stale:
            torch._foreach_zero_(stale)
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g


class LayerGraphs:
    """A layer's GraphedLayer per input signature."""

    def __init__(self, bank: GraphBank, layer: torch.nn.Module):
        self.bank = bank
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.by_sig: dict = {}
        bank.holders.append(self)

    def clear(self) -> None:
        self.by_sig.clear()

    def get(self, hidden: torch.Tensor, kwargs: dict, run, key_extra=()) -> tuple[GraphedLayer, list] | None:
        """(graphed pass, keyword tensors to load) for this call, or None if it can't be graphed.
        run(h, **kwargs) computes the layer; it is called with the static keyword buffers."""
        if not self.bank.usable(hidden):
            return None
        flat = _flatten(kwargs)
        if flat is None:
            return None
        sig, tensors = flat
        full = (tuple(hidden.shape), hidden.dtype, sig)
        entry = self.by_sig.get((full, key_extra))
        if entry is None:
            s = self.bank.statics_for(full, hidden, tensors)
            static_kwargs = _rebuild(kwargs, s.kw)
            entry = GraphedLayer(self.bank, s, lambda h, grad_only=False: run(h, grad_only=grad_only, **static_kwargs),
                                 self.params)
            self.by_sig[(full, key_extra)] = entry
        return entry, tensors


def single_process() -> bool:
    """No DDP/FSDP: graphs need it (DDP/FSDP reduce gradients from hooks on autograd's accumulation, which a
    graph bypasses), and so does model/embeddings.py (they expect every parameter on the process's GPU)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)


class GraphedCall:
    """fn(*inputs) -> tuple of tensors as a CUDA graph in the bank's pool, for inputs of the bank's current
    shape (the chunked cross-entropy: its logits chunks then share memory with the layers' passes instead
    of sitting beside them in the ordinary pool). Returns None where the caller must run fn eagerly."""

    def __init__(self, bank: GraphBank, fn):
        self.bank, self.fn = bank, fn
        self.entries: dict = {}
        bank.holders.append(self)

    def clear(self) -> None:
        self.entries.clear()

    def __call__(self, *inputs: torch.Tensor):
        bank = self.bank
        if not (bank.enabled and bank.active) or torch.is_autocast_enabled("cuda"):
            return None
        if inputs[0].shape[0] != bank.shape[0] * bank.shape[1]:  # not the layers' micro-batch shape
            return None
        sig = tuple((tuple(t.shape), t.dtype) for t in inputs)
        e = self.entries.setdefault(sig, {"calls": 0, "graph": None})
        e["calls"] += 1
        if e["graph"] is None:
            if e["calls"] < 2:
                return None
            e["inputs"] = [torch.empty_like(t) for t in inputs]
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, pool=bank.pool):
                    e["outputs"] = self.fn(*e["inputs"])
            except Exception as err:  # noqa: BLE001
                bank.fail("capturing the loss", err)
                return None
            e["graph"] = g
            bank.captured += 1
        for dst, src in zip(e["inputs"], inputs):
            dst.copy_(src)
        e["graph"].replay()
        return tuple(o.clone() for o in e["outputs"])
