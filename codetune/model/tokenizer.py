"""Tokenizers: a real model's own, a given tokenizer.json, or — offline, for the tiny model — a small
byte-level BPE trained at run time on the local corpus and cached.

Every tokenizer leaves here with stable-code's special tokens (EOS and the four FIM tokens), each a
single id; FIM data built with a tokenizer that splits them would be silently wrong.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from codetune import registry
from codetune.atomic import write_file
from codetune.fields import ConfigError
from codetune.model.arch import SpecialTokens


class TokenizerError(ConfigError):
    """No usable tokenizer: the user's to fix (a ConfigError, so every command says it in one line)."""


def _from_pretrained(src: str, **kwargs):
    """AutoTokenizer.from_pretrained, with a folder or file that holds no tokenizer (transformers raises
    OSError or ValueError, over several lines) said in one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerError(f"cannot load a tokenizer from {src!r} ({first}); give a model folder that holds its "
                             "tokenizer files (tokenizer.json), a hub id, or --tokenizer") from None


def cache_root() -> Path:
    return Path(os.environ.get("CODETUNE_CACHE", Path.home() / ".cache" / "codetune"))


def _wrap(tokenizer_file: str | Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))


def ensure_special_tokens(tok, tokens: SpecialTokens | None = None):
    """Add any missing EOS/FIM tokens of `tokens` (a model family's, model/arch/; None: the family whose FIM
    tokens `tok` already holds, registry.tokens_in), set eos/pad, and check each encodes to one id."""
    tokens = tokens or registry.tokens_in(tok)
    have = set(tok.get_vocab())
    missing = [t for t in tokens.all() if t not in have]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.eos_token is None:
        tok.eos_token = tokens.eos
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for t in tokens.all():
        ids = tok.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise TokenizerError(f"special token {t!r} encodes to {len(ids)} ids {ids}; it must be one token. "
                                 "Use the model's own tokenizer or one that defines the FIM tokens.")
    return tok


def train_bpe(files: list[Path], vocab_size: int = 4096, max_bytes: int = 20_000_000,
              tokens: SpecialTokens | None = None):
    """Train a byte-level BPE on (a prefix of) `files`; special tokens (`tokens`, stable-code's if None) get
    the first ids, so EOS is 0 as in stable-code-3b (bos = eos = 0)."""
    tokens = tokens or registry.default_tokens()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        seen = 0
        for f in files:
            try:
                t = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            seen += len(t)
            yield t
            if seen >= max_bytes:
                return

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(tokens.all()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts(), trainer=trainer)
    return tk


def corpus_tokenizer(files: list[Path], vocab_size: int = 4096, cache_dir: Path | None = None,
                     tokens: SpecialTokens | None = None):
    """A BPE for these files, cached by the file list, sizes, vocab and special tokens so repeat runs reuse it."""
    tokens = tokens or registry.default_tokens()
    files = sorted(Path(f) for f in files)
    if not files:
        raise TokenizerError("no files to train a tokenizer on; give --tokenizer or a corpus with text files")
    h = hashlib.sha256(str(vocab_size).encode())
    if tokens != registry.default_tokens():  # (stable-code's keep the cache keys they always had)
        h.update(repr(tokens.all()).encode())
    for f in files[:5000]:
        try:
            h.update(f"{f}:{f.stat().st_size}".encode())
        except OSError:
            continue
    path = (cache_dir or cache_root() / "tokenizers") / h.hexdigest()[:16] / "tokenizer.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, lambda tmp: train_bpe(files, vocab_size, tokens=tokens).save(str(tmp)))
    return ensure_special_tokens(_wrap(path), tokens)


def load_tokenizer(model_cfg, corpus_files: list[Path] | None = None):
    """The tokenizer for a model setting: --tokenizer if given, the model's own if it has one, else a BPE
    trained on the corpus (tiny / random-init models only). Its special tokens are the model family's
    (registry.special_tokens): a tokenizer that lacks them gets them added (tiny-qwen2 in tests: the GPT-NeoX
    fixture with Qwen's FIM tokens)."""
    tokens = registry.special_tokens(model_cfg.model)
    if model_cfg.tokenizer:
        p = Path(model_cfg.tokenizer).expanduser()
        tok = _wrap(p) if p.is_file() else _from_pretrained(str(p))
        return ensure_special_tokens(tok, tokens)
    spec = registry.lookup(model_cfg.model)
    if spec is None or (spec.hub_id and not model_cfg.random_init):
        src = registry.resolve(model_cfg.model, "tokenizer_config.json")  # one line at once if it can't be had
        return ensure_special_tokens(_from_pretrained(src.path, trust_remote_code=model_cfg.trust_remote_code,
                                                      local_files_only=src.cache_only), tokens)
    if corpus_files:
        return corpus_tokenizer(corpus_files, tokens=tokens)
    raise TokenizerError(f"{model_cfg.model} with random init has no tokenizer of its own: pass --tokenizer "
                         "(a tokenizer.json or directory) or prepare data from a local corpus first")


def tokenizer_fingerprint(tok) -> str:
    """Identifies a tokenizer's vocabulary, so shards made with another tokenizer are refused."""
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]
