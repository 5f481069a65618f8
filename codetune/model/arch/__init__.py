"""What differs per model family, in one place: the config class, the special tokens, the norms, the
rotary width, the attention function, the planner's shape facts and what the fused layer
(model/fast_layer.py) cannot reproduce exactly. Everything else in codetune reads a family's facts
from its `Arch` record instead of assuming StableLM.

Families: arch/stablelm.py (stable-code-3b: LayerNorm with bias, partial rotary, optional q/k/v bias,
untied embeddings) and arch/qwen2.py (Qwen2.5-Coder: RMSNorm, full rotary, grouped-query attention,
q/k/v bias, tied embeddings at 1.5B/3B). A model whose family is not here still trains: transformers'
own layers run it (fast_layer.why_not_fused says so) and stable-code's special tokens are assumed.

Imports nothing heavy: registry.py (imported by `codetune --help`) reads these records, so the families
import torch and transformers inside their functions (the hot ones, norm and the attention function, are
asked for once per layer by fast_layer.FastDecoderLayer and kept).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SpecialTokens:
    """A family's end-of-text and fill-in-the-middle tokens. Each must be one token of the tokenizer, or FIM
    data is silently wrong (model/tokenizer.ensure_special_tokens and data/fim.check_fim_tokens check)."""
    eos: str
    fim_prefix: str
    fim_suffix: str
    fim_middle: str
    fim_pad: str

    def all(self) -> tuple[str, ...]:
        return (self.eos, self.fim_prefix, self.fim_suffix, self.fim_middle, self.fim_pad)

    def fim(self) -> tuple[str, str, str]:
        return (self.fim_prefix, self.fim_suffix, self.fim_middle)


@dataclass(frozen=True)
class ShapeFacts:
    """What the planner (plan/memory.Shape) reads from a config beyond the sizes every family names alike."""
    qkv_bias: bool      # q/k/v projections carry a bias
    tied: bool          # input embeddings shared with the output layer
    norm_tensors: int   # tensors per norm: 2 for LayerNorm (weight, bias), 1 for RMSNorm (weight)


@dataclass(frozen=True)
class Arch:
    family: str                                   # registry.ModelSpec.family
    model_type: str                               # transformers' config.model_type
    layer_class: str                              # transformers' decoder layer class name
    tokens: SpecialTokens
    hf_config: Callable[[dict], object]           # config keyword arguments -> a transformers config
    shape_facts: Callable[[dict], ShapeFacts]     # config.json as a dict -> the planner's facts
    norm: Callable[[], Callable]                  # -> f(norm module, x): normalized x, op for op as the module
    rotary_dims: Callable[[object], int]          # attention module -> how many dims of a head rotate
    attention_kwargs: Callable[[object], dict]    # attention module -> extra arguments of its attention call
    eager_attention: Callable[[], Callable]       # transformers' eager attention function of the family
    why_not_fused: Callable[[object], str | None]  # decoder layer -> what the fused layer cannot do exactly


def families() -> dict[str, Arch]:
    """Every family codetune knows, by name."""
    from codetune.model.arch import qwen2, stablelm

    return {a.family: a for a in (stablelm.ARCH, qwen2.ARCH)}


def by_family(family: str) -> Arch:
    return families()[family]


def by_model_type(model_type: str | None) -> Arch | None:
    """The family of a transformers model_type (config.json's), None for one codetune does not know."""
    return next((a for a in families().values() if a.model_type == model_type), None)


def of_layer(layer) -> Arch | None:
    """The family of a decoder layer, by its class (None: not a family codetune knows)."""
    name = type(layer).__name__
    return next((a for a in families().values() if a.layer_class == name), None)
