"""What static-KV-cache decoding needs from the model, for every decoder that runs through one
(export/static_decode.py: one stream, for generate and serve; eval/batch_decode.py: eval's batches;
serve/batching.py: serve's running batch): whether the model takes a static cache, the name its forward
gives the cache, moving the cache's write position (rewind, set_length), the SDPA backends of a step
(step_attention), and the capture of a one-token step as a CUDA graph, checked exact against the eager
step (capture_step, exact-or-fallback; graphed_step, the replay-or-capture-once rule every decoder steps by)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


def static_unsupported(model) -> str | None:
    """Why a static cache cannot run this model (None: it can)."""
    from codetune.model.adapters import causal_lm

    base = causal_lm(model)
    if not getattr(base, "_can_compile_fullgraph", False):
        return f"{type(base).__name__} does not declare support for a static KV cache"
    devices = set((getattr(base, "hf_device_map", None) or {}).values())
    if len(devices) > 1:
        return "the model is split across devices"
    attn = getattr(base.config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} (static decoding runs with sdpa or eager)"
    return None


@dataclass(frozen=True)
class HeadShape:
    """A model's attention heads as its KV cache holds them."""
    layers: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (fewer under grouped-query attention)
    head_dim: int


def head_shape(model) -> HeadShape:
    from codetune.model.adapters import causal_lm

    c = causal_lm(model).config
    heads = c.num_attention_heads
    return HeadShape(c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads,
                     getattr(c, "head_dim", None) or c.hidden_size // heads)


def cache_kwarg(model) -> str:
    """transformers is renaming `past_key_values` to `cache` (deprecated in 5.2x); use the name this
    version's forward declares, so the loop runs on older and newer releases without warnings."""
    from codetune.model.adapters import causal_lm

    base = causal_lm(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def rewind(cache, tokens: int = 1) -> None:
    """Move a transformers StaticCache back `tokens` positions (the keys and values stay; the next write
    overwrites them). Its `crop` does that from transformers 5.2x on; before, StaticCache.crop exists but
    its layers lack one (AttributeError on 5.17), so the layers' device-side position counter is moved
    directly, as the newer crop does."""
    for layer in cache.layers:
        if hasattr(layer, "crop"):
            layer.crop(-tokens)
        elif isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.sub_(tokens)
        else:
            raise TypeError(f"cannot rewind a {type(layer).__name__} cache layer (transformers {_tf_version()}): "
                            "no crop() and no cumulative_length; use --decode eager")


def set_length(cache, length: int) -> None:
    """Put a transformers StaticCache's write position at `length` (the keys and values before it are kept,
    those after are overwritten as the cache fills again), in place: a captured graph reads this counter.
    Needs an initialized cache (one forward has run through it)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)


def _tf_version() -> str:
    import transformers

    return transformers.__version__


STEP_SDPA = ("flash", "efficient", "math")  # SDPA backends a static-cache step may use (see step_attention)


def step_attention(backends: tuple[str, ...] = STEP_SDPA):
    """The SDPA backends a static-cache step runs with: by default all but cuDNN's. On an H200 (torch 2.11)
    cuDNN attention gave the same bf16 inputs a result one ulp apart on another stream, so a captured step
    never matched its eager reference and bf16 decoding lost its graphs; flash, memory-efficient and math
    attention are stream-independent (bench/graph_exactness.py, bench/results/decode_h200_2026-12-01_s7.md).
    `backends`, a subset of STEP_SDPA: what model/step_attention.StepAttention allows besides its own
    split-KV kernel (which takes the one-token steps where it runs; the prompt's pass is always SDPA's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH}
    bad = [b for b in backends if b not in names]
    if bad or not backends:
        raise ValueError(f"step SDPA backends {backends!r}: choose from {', '.join(STEP_SDPA)}")
    return sdpa_kernel([names[b] for b in backends])


@dataclass
class CapturedStep:
    """What capture_step gives: the graph (None where it could not run exactly), the step's logits from
    whichever ran, and why there is no graph."""
    graph: object | None  # torch.cuda.CUDAGraph
    logits: torch.Tensor  # the graph's output buffer where graph is set
    why: str | None = None


def capture_step(forward, rewind, device: torch.device, same_stream: bool = True) -> CapturedStep:
    """Capture `forward()` (a one-token step through a static cache, reading fixed input buffers) as a
    CUDA graph and check its first replay against the eager step from the same cache state. `rewind()`
    moves the cache back one token. Whatever happens, the cache ends one token on and the step's logits
    come back; every decoder captures through here (by graphed_step).
    same_stream=False captures on torch's own capture stream (bench/graph_exactness.py's comparison)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # the warm-up capture wants, and the step the replay is checked against
        ref = forward().clone()
    torch.cuda.current_stream(device).wait_stream(side)
    rewind()  # back to the position the graph will write
    graph = torch.cuda.CUDAGraph()
    try:
        # (captured on the stream the reference ran on: library handles and workspaces are per stream, and
        # a graph captured on another stream can pick other kernels, so the replay would differ by rounding)
        with torch.cuda.graph(graph, stream=side if same_stream else None, capture_error_mode="thread_local"):
            out = forward()
    except Exception as e:  # noqa: BLE001 - whatever stops a capture, the eager step still runs
        torch.cuda.synchronize(device)
        first_line = (str(e).splitlines() or [""])[0]
        # (nothing ran during the capture: redo the step)
        return CapturedStep(None, forward(), f"capture failed ({type(e).__name__}: {first_line})")
    graph.replay()
    if not torch.equal(out, ref):
        diff = (out.float() - ref.float()).abs().max().item()
        rewind()  # the replay's keys and values are not trusted: redo the step eagerly
        return CapturedStep(None, forward(),
                            f"the graphed step's logits differ from the eager step's (max |diff| {diff:.3g})")
    return CapturedStep(graph, out)


def graphed_step(slot, stats, forward, device: torch.device) -> tuple[torch.Tensor, str | None]:
    """One step of a static-cache decoder whose graphs are on (export/static_decode's Decoder, eval's
    BatchDecoder, serve's running batch): replay the slot's graph; else capture it once (capture_step, exact or fall back) and keep it;
    else, after a failed capture, run `forward()`. `slot` has `graph`, `logits`, `tried` and `cache`;
    `stats` counts `replays` and `captured`. Returns (the step's logits, why graphs must go off or None)."""
    if slot.graph is not None:
        slot.graph.replay()
        stats.replays += 1
        return slot.logits, None
    if slot.tried:
        return forward(), None
    slot.tried = True
    got = capture_step(forward, lambda: rewind(slot.cache), device)
    if got.graph is None:
        return got.logits, got.why
    slot.graph, slot.logits = got.graph, got.logits
    stats.captured += 1
    return got.logits, None
