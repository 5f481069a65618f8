"""Builds a saved adapter on tiny-stablelm (random init) for the export and serve tests: the same files
`codetune train` writes, through the same writer (save_adapter), with non-zero LoRA weights so that
merging and serving are tested with an adapter that changes the output."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from codetune.config import AdapterConfig, ModelConfig
from codetune.model.adapter_files import save_adapter
from codetune.model.adapters import apply_adapters
from codetune.model.load import load_model, padded_vocab
from codetune.model.tokenizer import ensure_special_tokens

TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "gpt-neox-20b.json"


def tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return ensure_special_tokens(PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER)))


def build_tiny_adapter(out_dir: Path, method: str = "lora", seed: int = 1) -> Path:
    tok = tiny_tokenizer()
    vocab = padded_vocab(tok)
    mcfg = ModelConfig(model="tiny-stablelm", random_init=True, precision="fp32")
    acfg = AdapterConfig(method=method, rank=4, alpha=8.0)
    model, _ = load_model(mcfg, torch.device("cpu"), vocab_size=vocab)
    model = apply_adapters(model, acfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # LoRA's B starts at zero (a no-op adapter); full fine-tuning starts at the base weights
            if p.requires_grad and (method == "full" or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    info = {"model": dataclasses.asdict(mcfg), "vocab_size": vocab, "init_seed": 0, "method": method,
            "adapter": dataclasses.asdict(acfg), "train": {"steps": 3, "lr": 2e-4, "seq_len": 64},
            "data_manifest": {"files": 12, "tokens": 34567, "languages": {"python": 12}}}
    return save_adapter(model, tok, info, out_dir)


@pytest.fixture(scope="session", autouse=True)
def codetune_cache(tmp_path_factory):
    """Random-init checkpoints and tokenizers go to a temporary cache, not the user's."""
    old = os.environ.get("CODETUNE_CACHE")
    os.environ["CODETUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("CODETUNE_CACHE", None)
    else:
        os.environ["CODETUNE_CACHE"] = old
