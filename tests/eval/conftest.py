"""Fixtures for the eval tests: the realistic test tokenizer (tests/conftest.py finds it and isolates
the cache), the tiny random-init StableLM built through the real loader, and a prepared data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer(shared_tokenizer_path):
    from codetune.config import ModelConfig
    from codetune.model.tokenizer import load_tokenizer

    return load_tokenizer(ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(shared_tokenizer_path)))


@pytest.fixture(scope="session")
def tiny_model(tokenizer, shared_tokenizer_path):
    from codetune.config import ModelConfig
    from codetune.model.load import load_model, padded_vocab

    cfg = ModelConfig(model="tiny-stablelm", random_init=True, tokenizer=str(shared_tokenizer_path))
    model, _ = load_model(cfg, torch.device("cpu"), vocab_size=padded_vocab(tokenizer), seed=0)
    return model.eval()


def stdlib_sources(n: int = 6) -> list[tuple[str, str]]:
    """Real code to evaluate on: a few small standard-library modules."""
    import json
    import textwrap

    names = [textwrap.__file__, json.__file__, json.decoder.__file__, json.encoder.__file__,
             str(Path(json.__file__).with_name("scanner.py")), str(Path(textwrap.__file__).with_name("glob.py"))]
    return [(Path(p).name, Path(p).read_text()[:3000]) for p in names[:n]]


def write_split(data_dir: Path, split: str, tok, docs: list[str], seq_len: int = 256) -> None:
    from codetune.data.shards import Packer, ShardWriter

    w = ShardWriter(data_dir / split, seq_len, len(tok))
    p = Packer(w, tok.eos_token_id, tok.pad_token_id)
    for d in docs:
        p.add_document(tok.encode(d, add_special_tokens=False))
    p.finish()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer):
    """A prepared data directory in the on-disk shard format (written directly, independent of prepare's
    pipeline): val holds real code plus one FIM-formatted document that the FIM suite must skip."""
    import json

    from codetune import registry
    from codetune.model.tokenizer import tokenizer_fingerprint

    d = tmp_path_factory.mktemp("data")
    docs = [t for _, t in stdlib_sources()]
    fim_doc = f"{registry.default_tokens().fim_prefix}def a():\n{registry.default_tokens().fim_suffix}\n    return 1\n{registry.default_tokens().fim_middle}    x = 2\n"
    write_split(d, "train", tokenizer, docs[:2])
    write_split(d, "val", tokenizer, docs[2:] + [fim_doc])
    tokenizer.save_pretrained(d / "tokenizer")
    (d / "manifest.json").write_text(json.dumps({"tokenizer": tokenizer_fingerprint(tokenizer)}))
    return d
