"""Known models: a short name -> where to load it from and its exact architecture.

The architecture is written out (not fetched) so that a random-init model of the real shape can be
built offline for tests, the planner and benchmarks: weight values don't change memory or speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# stable-code's special tokens. FIM strings must each be one token, or FIM data is silently wrong.
EOS_TOKEN = "<|endoftext|>"
FIM_PREFIX = "<fim_prefix>"
FIM_SUFFIX = "<fim_suffix>"
FIM_MIDDLE = "<fim_middle>"
FIM_PAD = "<fim_pad>"
SPECIAL_TOKENS = (EOS_TOKEN, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FIM_PAD)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None  # None: exists only as a random-init shape (tiny test model)
    arch: dict = field(default_factory=dict)  # StableLmConfig keyword arguments
    description: str = ""

    @property
    def max_positions(self) -> int:
        return int(self.arch["max_position_embeddings"])

    def hf_config(self, vocab_size: int | None = None):
        """A transformers StableLmConfig of this exact shape (vocab may be overridden for tiny models)."""
        from transformers import StableLmConfig

        kw = dict(self.arch)
        if vocab_size is not None:
            kw["vocab_size"] = vocab_size
        return StableLmConfig(**kw)


# Values of stabilityai/stable-code-3b's config.json.
_STABLE_CODE_3B = dict(
    vocab_size=50304, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
    max_position_embeddings=16384, rope_theta=1_000_000, partial_rotary_factor=0.25,
    layer_norm_eps=1e-5, use_qkv_bias=False, use_parallel_residual=False, qk_layernorm=False,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, hidden_dropout=0.0,
    attention_dropout=0.0,
)

# Same architecture, scaled down: 2 layers, hidden 64. Vocab follows the tokenizer it is built with.
# A wider init than the 3B's 0.02: with hidden size 64 and a frozen random output layer, 0.02 leaves
# logits nearly flat, so LoRA could barely move the loss and the demo would show nothing learning.
_TINY = dict(_STABLE_CODE_3B, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
             vocab_size=4096, initializer_range=0.3)

MODELS: dict[str, ModelSpec] = {
    "stable-code-3b": ModelSpec(
        "stable-code-3b", "stabilityai/stable-code-3b", _STABLE_CODE_3B,
        "2.7B StableLM code model, 16k context, fill-in-the-middle"),
    "tiny-stablelm": ModelSpec(
        "tiny-stablelm", None, _TINY, "2-layer random-init StableLM for tests and the offline demo"),
}


def lookup(name: str) -> ModelSpec | None:
    """The spec for a registry name, or None for a hub id / local directory."""
    return MODELS.get(name)
