"""Shared fixtures. Every test gets its own codetune cache (no leaks into ~/.cache), and GPU tests are
skipped unless CUDA is present (they run through the device tool, see docs/testing.md)."""

import os
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The GPT-NeoX-20B tokenizer (Apache-2.0; stable-code-3b's base), shipped with the tests so the suite runs
# from the repository alone.
NEOX_TOKENIZER = REPO / "tests" / "fixtures" / "gpt-neox-20b.json"


def pytest_configure(config):
    os.environ.setdefault("CODETUNE_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"codetune-test-{os.getpid()}"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def shared_tokenizer_path() -> Path:
    return NEOX_TOKENIZER


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, stdlib) -> Path:
    """A small prepared dataset (stdlib json/ email/ logging/ packages), seq_len 128, shared by tests."""
    from codetune.config import build
    from codetune.data.prepare import prepare

    out = tmp_path_factory.mktemp("tiny") / "data"
    flags = {"model.model": "tiny-stablelm", "model.random_init": True,
             "data.sources": [str(stdlib / d) for d in ("json", "email", "logging", "http", "xml")],
             "data.data_dir": str(out), "data.seq_len": 128, "data.val_fraction": 0.3, "data.fim_rate": 0.5}
    cfgs = build(["model", "data"], flags=flags)
    prepare(cfgs["data"], cfgs["model"])
    return out
