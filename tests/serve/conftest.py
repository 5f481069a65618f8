import sys
from pathlib import Path

import pytest
import torch

# the tiny-adapter builder is shared with the export tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from serve_support import API_KEY, MODEL, running_server  # noqa: E402,F401 (shared with the tests)
from tiny_adapter import build_tiny_adapter, codetune_cache  # noqa: E402,F401 (codetune_cache is a fixture)

from codetune.config import ModelConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):  # after the autouse codetune_cache
    from codetune.export.generate import load_for_inference

    adapter = build_tiny_adapter(tmp_path_factory.mktemp("run") / "adapter")
    return load_for_inference(ModelConfig(), str(adapter), torch.device("cpu"))[:2]


@pytest.fixture(scope="session")
def server(tiny_model):
    from codetune.serve.limits import Limits

    with running_server(*tiny_model, Limits(max_tokens=1000, max_choices=4, max_pending=512,
                                            max_body_bytes=64 * 1024)) as srv:
        yield srv


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
