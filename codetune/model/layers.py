"""How each decoder layer runs in training — the ONE place where codetune changes how a transformers
model's layers run. It swaps the `forward` of each decoder-layer instance (never a library class) for a
runner. In training the runner computes the layer with model/fast_layer.py's fused forward where that is
exact (else transformers' own forward), in one of three modes:

* frozen prefix (no trainable parameter in the layer and no gradient flowing in): run under
  `torch.no_grad()` — no autograd graph, nothing stored. This is what makes `--train-layers last:N`
  fast; PEFT's `layers_to_transform` still back-propagates through every layer.
* checkpointed: keep only the layer's input, recompute the layer in backward (non-reentrant-style
  semantics are not needed: the input is the only tensor that crosses the boundary). Optionally the
  kept input lives in pinned CPU RAM: copied out on a side stream during forward, prefetched back one
  layer ahead during backward, so the copies overlap compute.
* plain: gradient checkpointing off.

transformers skips its own checkpointing when the model is not in train() mode; ours keys on
`torch.is_grad_enabled()` and the layer's `training` flag the same way, and the trainer calls
`model.train()` explicitly. (The other instance-level swap, of PEFT LoRA linears, is model/lora_fast.py's
`install_fast_lora`, called from the same place in train/recipe.py with the same engine_state.EngineState.)
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from codetune.model.engine_state import EngineState

log = logging.getLogger(__name__)


def _has_trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class ActivationOffloader:
    """Pinned CPU buffers for checkpointed layer inputs, reused across steps (pinned allocation is slow).

    Stream discipline, because the caching allocator keeps one pool per stream: every GPU tensor here
    is allocated on the compute stream and only *read or written* by the copy stream, with events in
    both directions — no record_stream, whose deferred frees were measured to triple reserved memory.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.buffers: dict[int, torch.Tensor] = {}
        self.sources: dict[int, tuple[torch.Tensor, object]] = {}  # kept alive until their D2H copy ran
        self.fetched: dict[int, tuple[torch.Tensor, object]] = {}  # H2D copies in flight

    def _buffer(self, idx: int, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(idx)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.copy_stream is not None)
            self.buffers[idx] = buf
        return buf

    def _release_sources(self) -> None:
        """Drop every in-flight source but the newest. The compute stream first waits for their copies'
        events, so a later kernel that reuses the memory runs after the copy has read it; by then (a
        layer later) the copy is long done, so the wait costs nothing. (Dropping them only once
        `event.query()` said done kept every source alive while the CPU ran ahead of the GPU: 26 of 32
        layer inputs at once with CUDA graphs, 0.5 GiB at 4k, measured at the step's peak.)"""
        stream = torch.cuda.current_stream(self.device)
        while len(self.sources) > 1:
            _, ev = self.sources.pop(next(iter(self.sources)))
            stream.wait_event(ev)

    def store(self, idx: int, t: torch.Tensor) -> None:
        buf = self._buffer(idx, t)
        if self.copy_stream is None:
            buf.copy_(t)
            return
        self._release_sources()
        self.sources[idx] = (t, self._side_copy(buf, t))

    def prefetch(self, idx: int) -> None:
        if idx in self.fetched or idx not in self.buffers or self.copy_stream is None:
            return
        buf = self.buffers[idx]
        dst = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)  # compute-stream pool
        self.fetched[idx] = (dst, self._side_copy(dst, buf))

    def _side_copy(self, dst: torch.Tensor, src: torch.Tensor):
        """dst.copy_(src) on the copy stream, after the compute stream's work so far; returns the event
        that marks the copy's end."""
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        return ev

    def load(self, idx: int) -> torch.Tensor:
        if self.copy_stream is None:
            return self.buffers[idx].clone()
        self.prefetch(idx)
        dst, ev = self.fetched.pop(idx)
        torch.cuda.current_stream(self.device).wait_event(ev)
        self.sources.pop(idx, None)
        return dst


def _stochastic(layer: torch.nn.Module) -> bool:
    """Does the layer draw random numbers in training (dropout)? Only then must a recompute replay RNG."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules()):
        return True
    return any(float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0 for m in layer.modules())


class _CheckpointedLayer(torch.autograd.Function):
    """Runs fn(hidden) without keeping its activations; recomputes it in backward."""

    @staticmethod
    def forward(ctx, hidden, anchor, fn, offloader, idx, prev_idx, replay_rng, graphed):
        ctx.fn, ctx.offloader, ctx.idx, ctx.prev_idx, ctx.graphed = fn, offloader, idx, prev_idx, graphed
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        ctx.device_type = hidden.device.type
        ctx.cpu_rng = torch.get_rng_state() if replay_rng else None
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if (replay_rng and hidden.is_cuda) else None
        if offloader is not None:
            offloader.store(idx, hidden)
        else:
            ctx.save_for_backward(hidden)
        if graphed is not None:
            out = graphed[0].forward(hidden, graphed[1])
            if out is not None:
                return out
        with torch.no_grad():
            return fn(hidden)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.offloader is not None:
            hidden = ctx.offloader.load(ctx.idx)
            if ctx.prev_idx is not None:
                ctx.offloader.prefetch(ctx.prev_idx)  # overlap the next layer's copy with this recompute
        else:
            (hidden,) = ctx.saved_tensors
        if ctx.graphed is not None:
            grad_in = ctx.graphed[0].backward(hidden, grad_out, ctx.graphed[1])
            if grad_in is not None:
                return _grads(ctx, grad_in)
        hidden = hidden.detach().requires_grad_(True)
        enabled, dtype = ctx.autocast
        replay = ctx.cpu_rng is not None  # only layers with dropout draw random numbers
        rng = torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else []) if replay else nullcontext()
        with rng:
            if replay:
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                out = ctx.fn(hidden, grad_only=True)  # (only back-propagated through: its values are unused)
        torch.autograd.backward(out, grad_out)
        return _grads(ctx, hidden.grad)


def _grads(ctx, grad_in):
    """_CheckpointedLayer.backward's return: the input's gradient only where the input wants one (not
    behind a frozen prefix, where the anchor is what brought autograd here)."""
    return (grad_in if ctx.needs_input_grad[0] else None), None, None, None, None, None, None, None


def new_anchor() -> torch.Tensor:
    """A leaf that requires grad, passed to the first trained layer behind frozen ones: autograd only calls a
    Function's backward (and so reaches the LoRA weights inside) when some input requires grad. Making the
    layer input itself a grad-requiring leaf instead would keep it alive until the end of backward (its
    AccumulateGrad node holds it): 80 MiB at 16k tokens, measured at the peak. One per installation."""
    return torch.zeros((), requires_grad=True)


class LayerRunner:
    """Replaces one decoder layer's forward (instance attribute, see module docstring). `state` and
    `anchor` are the installation's, shared by all its runners."""

    def __init__(self, layer, idx: int, checkpoint: bool, offloader: ActivationOffloader | None,
                 prev_idx: int | None, fast: bool = True, bank=None, state: EngineState | None = None,
                 anchor: torch.Tensor | None = None):
        from codetune.model.fast_layer import fast_forward

        self.layer, self.idx = layer, idx
        self.anchor = anchor if anchor is not None else new_anchor()
        # the instance's current forward: an Accelerate dispatch hook (weights offloaded to CPU) if one is
        # installed, so weights still arrive on the GPU before the layer runs
        self.original = layer.forward
        self.hooked = "forward" in layer.__dict__
        self.checkpoint, self.offloader, self.prev_idx = checkpoint, offloader, prev_idx
        self.trainable = _has_trainable(layer)
        self.replay_rng = _stochastic(layer)
        self.fast = fast_forward(layer, state) if (fast and not self.hooked) else None
        self.graphs = None
        self.bank = bank
        if bank is not None and self.fast is not None and not self.replay_rng:
            from codetune.model.graphs import LayerGraphs

            self.graphs = LayerGraphs(bank, layer)

    def _forward(self, hidden, args, kwargs, graphs: bool = True):
        """(the layer's training forward, its CUDA-graphed passes or None): the fused forward while the
        adapters stay on the fast path, graphed where model/graphs.py allows."""
        parts = self.fast.parts() if (self.fast is not None and not args) else None
        if parts is None or kwargs.get("position_embeddings") is None:
            return (lambda h, grad_only=False: self.original(h, *args, **kwargs)), None
        graphed = None
        if self.graphs is not None and graphs:
            key = tuple((p.A.data_ptr(), p.B.data_ptr()) if p.A is not None else None for p in parts)
            graphed = self.graphs.get(hidden, kwargs, lambda h, **kw: self.fast(h, parts=parts, **kw), key)
        return (lambda h, grad_only=False: self.fast(h, parts=parts, grad_only=grad_only, **kwargs)), graphed

    def __call__(self, hidden_states, *args, **kwargs):
        if not (torch.is_grad_enabled() and self.layer.training):
            if torch.is_grad_enabled() or kwargs.get("use_cache") or any(kwargs.get(k) is not None for k in _CACHES):
                return self.original(hidden_states, *args, **kwargs)
            # Validation (no grad, no KV cache) runs the training path's forward, so its numbers and memory are
            # the training path's (transformers' layer would dequantize and allocate anew): the same CUDA graph
            # where training replays one (its memory is the graphs' pool, already reserved), else the fused
            # forward eagerly.
            fn, graphed = self._forward(hidden_states, args, _without_cache(kwargs))
            out = graphed[0].forward(hidden_states, graphed[1]) if graphed is not None else None
            if out is not None:
                return out
            with torch.no_grad():
                return fn(hidden_states)
        # training never reads a KV cache; dropping it keeps the recompute identical to the forward
        kwargs = _without_cache(kwargs)
        fn, graphed = self._forward(hidden_states, args, kwargs)
        if not self.trainable and not hidden_states.requires_grad:
            out = graphed[0].forward(hidden_states, graphed[1]) if graphed is not None else None
            if out is not None:
                return out
            with torch.no_grad():  # frozen prefix: forward only
                return fn(hidden_states)
        if not self.checkpoint:
            return fn(hidden_states)  # (autograd keeps the activations: nothing to graph)

        anchor = None if hidden_states.requires_grad else self.anchor  # (first trained layer: see new_anchor)
        return _CheckpointedLayer.apply(hidden_states, anchor, fn, self.offloader, self.idx, self.prev_idx,
                                        self.replay_rng, graphed)


_CACHES = ("cache", "past_key_values", "past_key_value")


def _without_cache(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "use_cache" and k not in _CACHES}


def graph_bank(model):
    """The CUDA-graph bank install_layer_runners made for this model (None: graphs off or not installed),
    read from its layer runners."""
    for layer in decoder_layers(model):
        runner = layer.__dict__.get("forward")
        if isinstance(runner, LayerRunner):
            return runner.bank
    return None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a (possibly PEFT-wrapped) causal LM."""
    m = model
    for attr in ("base_model", "model"):
        while hasattr(m, attr) and not hasattr(m, "layers"):
            m = getattr(m, attr)
    if not hasattr(m, "layers"):
        raise TypeError(f"cannot find decoder layers in {type(model).__name__}")
    return m.layers


def install_layer_runners(model, checkpoint: bool = True, offload: bool = False, fast: bool = True,
                          cuda_graphs: str = "off", state: EngineState | None = None) -> ActivationOffloader | None:
    """Swap every decoder layer's forward for a LayerRunner. Call after adapters/freezing are applied
    (trainability is read once here). `fast`: use model/fast_layer.py where exact. `cuda_graphs`: auto | on
    | off, model/graphs.py (CUDA, fused layers, one process). `state`: the installation's (train/recipe.py
    shares one with install_fast_lora); a new one if None. Returns the offloader."""
    layers = decoder_layers(model)
    state, anchor = state or EngineState(), new_anchor()
    device = next(model.parameters()).device
    offloader = ActivationOffloader(device) if (checkpoint and offload) else None
    bank = None
    if cuda_graphs != "off" and device.type == "cuda" and fast and checkpoint:
        from codetune.model.graphs import GraphBank, single_process

        bank = GraphBank(cuda_graphs) if single_process() else None
    prev, plain = None, {}
    for i, layer in enumerate(layers):
        runner = LayerRunner(layer, i, checkpoint, offloader, prev, fast, bank, state, anchor)
        layer.forward = runner
        if runner.trainable or prev is not None:
            prev = i
        if fast and runner.fast is None:
            from codetune.model.fast_layer import why_not_fused

            why = "an offload hook wraps its forward" if runner.hooked else why_not_fused(layer)
            plain[why] = plain.get(why, 0) + 1
    for why, n in plain.items():  # (the engine plan asked for fused layers: say where they step aside)
        log.info("%d of %d decoder layers keep transformers' forward: %s", n, len(layers), why)
    return offloader


def uninstall_layer_runners(model) -> None:
    for layer in decoder_layers(model):
        runner = layer.__dict__.get("forward")
        if isinstance(runner, LayerRunner):
            del layer.forward
            if runner.hooked:  # put back the dispatch hook we wrapped
                layer.forward = runner.original
