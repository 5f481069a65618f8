"""Known models: a short name -> where to load it from and its exact architecture.

The architecture is written out (not fetched) so that a random-init model of the real shape can be
built offline for tests, the planner and benchmarks: weight values don't change memory or speed.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from codetune.fields import ConfigError
from codetune.model import arch as archs  # (the records only: the families import torch when first asked)
from codetune.model.arch import SpecialTokens

DEFAULT_FAMILY = "stablelm"


def default_tokens() -> SpecialTokens:
    """What a model whose family codetune cannot tell (a hub id not in the cache, a config of an unknown
    family) gets: stable-code's special tokens, as every model did before there were families."""
    return archs.by_family(DEFAULT_FAMILY).tokens


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hub_id: str | None  # None: exists only as a random-init shape (tiny test model)
    arch: dict = field(default_factory=dict)  # the family's transformers config keyword arguments
    description: str = ""
    family: str = DEFAULT_FAMILY  # model/arch/: which family's config, layers and special tokens

    @property
    def max_positions(self) -> int:
        return int(self.arch["max_position_embeddings"])

    @property
    def family_arch(self) -> archs.Arch:
        return archs.by_family(self.family)

    @property
    def tokens(self) -> SpecialTokens:
        return self.family_arch.tokens

    def hf_config(self, vocab_size: int | None = None):
        """A transformers config of this family and exact shape (vocab may be overridden for tiny models)."""
        kw = dict(self.arch)
        if vocab_size is not None:
            kw["vocab_size"] = vocab_size
        return self.family_arch.hf_config(kw)


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

# Same layer design again (partial rotary 0.25, LayerNorm, SwiGLU, untied embeddings, rope base 1e6), at a
# size that can be pretrained from random init in minutes on one GPU: bench/quality/ pretrains it on real
# code to have a code model to fine-tune where no pretrained one can be downloaded. 114M parameters with
# the GPT-NeoX vocabulary, 50M of them in the 10 blocks; the 3B's init range.
_SMALL = dict(_STABLE_CODE_3B, hidden_size=640, intermediate_size=1728, num_hidden_layers=10,
              num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=4096)

# Values of Qwen/Qwen2.5-Coder-1.5B's config.json: grouped-query attention (12 heads, 2 kv heads), q/k/v bias,
# RMSNorm, full rotary with base 1e6, input embeddings tied to the output layer. Sliding window off, as there
# (its other fields are left at transformers' defaults: with it off, no layer reads them).
_QWEN25_CODER_15B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
    attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643, initializer_range=0.02,
)

# The same design at test size: 2 layers, hidden 64, 4 heads over 2 kv heads (grouped-query), the wider init
# of tiny-stablelm (same reason). Its tokenizer in tests: the GPT-NeoX fixture with Qwen's FIM tokens added
# by model/tokenizer.ensure_special_tokens (docs/training.md, Model families).
_TINY_QWEN2 = dict(_QWEN25_CODER_15B, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, vocab_size=4096,
                   initializer_range=0.3, bos_token_id=0, eos_token_id=0)

MODELS: dict[str, ModelSpec] = {
    "stable-code-3b": ModelSpec(
        "stable-code-3b", "stabilityai/stable-code-3b", _STABLE_CODE_3B,
        "2.7B StableLM code model, 16k context, fill-in-the-middle"),
    "tiny-stablelm": ModelSpec(
        "tiny-stablelm", None, _TINY, "2-layer random-init StableLM for tests and the offline demo"),
    "stablelm-114m": ModelSpec(
        "stablelm-114m", None, _SMALL, "10-layer StableLM of stable-code-3b's design, pretrained from scratch by "
        "bench/quality"),
    "qwen2.5-coder-1.5b": ModelSpec(
        "qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B", _QWEN25_CODER_15B,
        "1.5B Qwen2.5-Coder: grouped-query attention, tied embeddings, 32k context, fill-in-the-middle",
        family="qwen2"),
    "tiny-qwen2": ModelSpec(
        "tiny-qwen2", None, _TINY_QWEN2, "2-layer random-init Qwen2 for tests of the second model family",
        family="qwen2"),
}


def lookup(name: str) -> ModelSpec | None:
    """The spec for a registry name, or None for a hub id / local directory."""
    return MODELS.get(name)


def family_of(name: str) -> archs.Arch | None:
    """The family of a registry name, a local model directory or a hub id in the local cache (read from its
    config.json's model_type, offline); None where it cannot be told or is not one codetune knows."""
    spec = lookup(name)
    if spec is not None:
        return spec.family_arch
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except ValueError:  # not a valid repo id
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return archs.by_model_type(json.loads(path.read_text(encoding="utf-8")).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return None


def special_tokens(name: str) -> SpecialTokens:
    """The special tokens of model `name` (see family_of), stable-code's where its family is unknown."""
    family = family_of(name)
    return family.tokens if family is not None else default_tokens()


def tokens_in(tok) -> SpecialTokens:
    """The special tokens of the family whose FIM tokens tokenizer `tok` already holds (a saved run's or a
    merged model's tokenizer); stable-code's where none does."""
    has = _token_check(tok)
    for family in archs.families().values():
        if all(has(t) for t in family.tokens.fim()):
            return family.tokens
    return default_tokens()


def _token_check(tok):
    """Whether `tok` holds a token string, asked of the fast tokenizer's own index: `get_vocab()` builds a
    dict of the whole vocabulary on every call (~15 ms for GPT-NeoX's 50k), and serve asks this for every
    FIM request (export/sampling.fim_layout), inside its latency budget."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return lambda t: backend.token_to_id(t) is not None
    vocab = tok.get_vocab()
    return vocab.__contains__


# ----------------------------------------------------------------------------------------------
# Where a model's files come from: a local directory, or the Hugging Face Hub (through its cache).
# Asked before any download, so a typo or a machine without network gets one line at once instead of
# the Hub client's retries (~48 s) and a long traceback.

HUB_CHECK_SECONDS = 1.5  # a reachable hub answers a TCP connect in well under this


@dataclass(frozen=True)
class Source:
    """What from_pretrained reads, and whether it must stay off the network."""
    path: str               # a local directory or a hub id
    local: bool             # a directory on this machine
    cache_only: bool        # a hub id read from the local cache alone (offline, or the hub unreachable)


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path. 'owner/model' is also a hub id's shape, so a one-slash name
    counts as a path only when its first folder exists here (runs/mergd beside runs/)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).expanduser().is_dir()


def check_local_path(name: str) -> None:
    """A path-like name that does not exist: say so, with the nearest sibling that does."""
    p = Path(name).expanduser()
    if p.exists() or not looks_like_path(name):
        return
    near = []
    if p.parent.is_dir():
        near = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir() if c.is_dir()], n=1)
    hint = f"did you mean {str(p.parent / near[0])!r}? Otherwise give" if near else "give"
    raise ConfigError(f"model={name!r}: no such directory; {hint} a local model directory, a hub id like "
                      f"stabilityai/stable-code-3b, or one of {list(MODELS)}")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (the Hub client reads them once, at import)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = HUB_CHECK_SECONDS) -> bool:
    """A TCP connect to the hub (or to the HTTPS proxy, when one is set), bounded by `timeout` including
    the name lookup, which has no timeout of its own: it runs in a thread that is not waited for."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def in_hub_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id
        return False


def resolve(name: str, filename: str = "config.json") -> Source:
    """Where to read model `name` (a registry name, hub id or directory) from; `filename` is a file the
    copy must have (config.json for a model, tokenizer_config.json for a tokenizer). Raises a one-line
    ConfigError for a missing path, or a hub id that is not cached while the hub is offline or unreachable."""
    spec = lookup(name)
    if spec is None:
        p = Path(name).expanduser()
        if p.exists():
            return Source(str(p), local=True, cache_only=False)
        check_local_path(name)
    hub_id = spec.hub_id if spec is not None and spec.hub_id else name
    offline = hub_offline()
    if in_hub_cache(hub_id, filename):
        return Source(hub_id, local=False, cache_only=offline or not hub_reachable())
    if offline or not hub_reachable():
        why = "offline mode is set (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable"
        raise ConfigError(f"{hub_id} is not in the local Hugging Face cache and {why}: download it on a machine "
                          f"with network (hf download {hub_id}) and copy the cache over, or pass --model "
                          "/path/to/local/copy")
    return Source(hub_id, local=False, cache_only=False)
