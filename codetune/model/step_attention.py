"""The attention block's kernels a static-cache decoder's forward passes run with (export/static_decode's
Decoder, eval/batch_decode's BatchDecoder, serve/batching's running batch).

Three parts, chosen per decoder by `kernels` (STEP_KERNELS):
- "split": the one-token step's attention through kernels/decode_attention (flash-decoding: the cache's
  keys split over the whole GPU). CUDA with Triton only; checked once, when the decoder is made, against
  SDPA on random inputs of the model's own head shapes (exact-or-fallback: its error against an fp64
  reference may be at most twice SDPA's own, else the decoder keeps SDPA and says why). Selected for the
  model instance only while a pass runs (its config's attention implementation, put back after), so
  the model outside the decoder is unchanged; a prompt's pass (several query positions) goes to
  transformers' own SDPA function either way.
- "fused-qkv": the one-token step's q, k and v in one matrix product (model/fused_qkv.py), where it is
  bit-identical to the three (checked when the decoder is made) and the projections are plain linears;
- "fused-rotary": the one-token step's rotary embedding and KV-cache write in one kernel
  (model/step_rotary.py, StableLM attention, bf16), where bit-identical to transformers' ops (checked
  when the decoder is made);
- "flash", "efficient", "math": the SDPA backends allowed (static_cache.step_attention: never cuDNN's,
  whose result depends on the stream, which no captured graph could match).

A captured CUDA graph holds whichever kernels ran at its capture, so a decoder's steps are the same
kernels from the first to the last; the graph's own check (static_cache.capture_step) then compares
its replay with an eager step of that same path, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from codetune.model.fused_qkv import FusedQKV
from codetune.model.kernels import decode_attention as kernel
from codetune.model.static_cache import STEP_SDPA, head_shape, step_attention
from codetune.model.step_rotary import StepRotary

log = logging.getLogger("codetune.decode")

STEP_KERNELS = ("split", "fused-qkv", "fused-rotary") + STEP_SDPA
SPLIT_NAME = "codetune_split_decode"  # the name registered with transformers' AttentionInterface
REFERENCE_NAME = "codetune_split_reference"  # the same selection with the PyTorch reference (tests, CPU)


def _split_forward(fn):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[2] != 1 or dropout or attention_mask is not None and attention_mask.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return fn(query, key, value, attention_mask, scaling), None
    return attention


def _register() -> None:
    """Name both functions in transformers' attention and mask registries (the library's extension points;
    idempotent). Their masks are SDPA's: the functions hand every pass they do not take to SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SPLIT_NAME, _split_forward(kernel.split_attention))
    AttentionInterface.register(REFERENCE_NAME, _split_forward(kernel.split_attention_reference))
    sdpa_mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    for name in (SPLIT_NAME, REFERENCE_NAME):
        AttentionMaskInterface.register(name, sdpa_mask)


@dataclass
class SplitCheck:
    """What the first-use check found: each kernel's largest error against the fp64 reference."""
    split_error: float
    sdpa_error: float
    ok: bool


def check_split(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                fn=None) -> SplitCheck:
    """Split attention against SDPA on random inputs of these head shapes: two rows whose masks end at
    different lengths, one cache not a multiple of the kernel's tiles. Passes when its largest error
    against fp64 attention is at most twice SDPA's own (or four units of the dtype's rounding, where
    SDPA's is smaller still)."""
    import torch.nn.functional as F

    fn = fn or kernel.split_attention
    g = torch.Generator(device="cpu").manual_seed(0)
    length = 1000
    q = torch.randn(2, heads, 1, head_dim, generator=g).to(device, dtype)
    k = torch.randn(2, kv_heads, length, head_dim, generator=g).to(device, dtype)
    v = torch.randn(2, kv_heads, length, head_dim, generator=g).to(device, dtype)
    mask = torch.zeros(2, 1, 1, length, dtype=torch.bool, device=device)
    mask[0, ..., :937] = True
    mask[1, ..., :61] = True
    group = heads // kv_heads
    kk, vv = (t.repeat_interleave(group, dim=1) for t in (k, v))
    # (the reference in fp64: in fp32 it would be SDPA itself, whose error would then read 0)
    ref = F.scaled_dot_product_attention(q.double(), kk.double(), vv.double(), attn_mask=mask).transpose(1, 2)
    with step_attention():
        sdpa = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)
    split = fn(q, k, v, mask, None)
    split_error = (split.double() - ref).abs().max().item()
    sdpa_error = (sdpa.double() - ref).abs().max().item()
    unit = torch.finfo(dtype).eps * ref.abs().max().item()
    return SplitCheck(split_error, sdpa_error, split_error <= max(2 * sdpa_error, 4 * unit))


def validate_kernels(kernels: tuple[str, ...]) -> tuple[str, ...]:
    """The SDPA backends of a kernel set; ValueError (naming the choices) for a set that cannot run."""
    bad = [k for k in kernels if k not in STEP_KERNELS]
    sdpa = tuple(k for k in kernels if k in STEP_SDPA)
    if bad or not sdpa:
        raise ValueError(f"step attention {tuple(kernels)!r}: choose from {', '.join(STEP_KERNELS)}, with at "
                         "least one SDPA backend (flash, efficient, math) for the prompt's pass")
    return sdpa


class StepAttention:
    """`with attention():` around a decoder's forward passes. `reference=True` runs the split path with
    the PyTorch reference instead of the Triton kernel, on any device (tests of the selection on the CPU)."""

    def __init__(self, model, kernels: tuple[str, ...] = STEP_KERNELS, reference: bool = False):
        from codetune.model.adapters import causal_lm

        self.kernels, self.sdpa = tuple(kernels), validate_kernels(kernels)
        self.config = causal_lm(model).config
        self.name: str | None = None  # the attention implementation a pass selects, None: the model's own
        self.why_not: str | None = None  # why "split" was asked for and is not used
        if "split" in kernels:
            self.name, self.why_not = self._choose(model, reference)
        self.qkv = FusedQKV(model) if "fused-qkv" in kernels else None
        if self.qkv is not None and self.qkv.why_not:
            log.info("codetune: q/k/v stay three products: %s", self.qkv.why_not)
        self.rotary = StepRotary(model, reference) if "fused-rotary" in kernels else None  # (says why not itself)

    def _choose(self, model, reference: bool) -> tuple[str | None, str | None]:
        weight = model.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        if getattr(self.config, "_attn_implementation", None) != "sdpa":
            return None, f"the model's attention is {self.config._attn_implementation!r}, not sdpa"
        if not reference and (device.type != "cuda" or not kernel.available()):
            return None, "needs CUDA and Triton"
        shape = head_shape(model)
        _register()
        if reference:
            return REFERENCE_NAME, None
        try:
            got = check_split(shape.heads, shape.kv_heads, shape.head_dim, dtype, device)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or run here: SDPA decodes
            why = f"the split kernel failed its check ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})"
            log.warning("codetune: %s; decoding with SDPA", why)
            return None, why
        if not got.ok:
            why = (f"the split kernel's error {got.split_error:.3g} is more than twice SDPA's {got.sdpa_error:.3g} "
                   "against fp64 attention")
            log.warning("codetune: %s; decoding with SDPA", why)
            return None, why
        return SPLIT_NAME, None

    @property
    def qkv_fused(self) -> bool:
        return self.qkv is not None and bool(self.qkv.stacks)

    @property
    def rotary_fused(self) -> bool:
        return self.rotary is not None and bool(self.rotary.attns)

    def describe(self) -> str:
        """What differs from transformers' own step ("" where nothing does)."""
        parts = ((["split-KV attention"] if self.name else []) + (["fused q|k|v"] if self.qkv_fused else [])
                 + (["fused rotary + cache write"] if self.rotary_fused else []))
        return ", ".join(parts)

    @contextlib.contextmanager
    def __call__(self):
        with step_attention(self.sdpa), (self.qkv() if self.qkv_fused else contextlib.nullcontext()), \
                (self.rotary() if self.rotary_fused else contextlib.nullcontext()):
            if self.name is None:
                yield
                return
            previous = self.config._attn_implementation
            self.config._attn_implementation = self.name
            try:
                yield
            finally:
                self.config._attn_implementation = previous
