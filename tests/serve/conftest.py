import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# the tiny-adapter builder is shared with the export tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from tiny_adapter import build_tiny_adapter, codetune_cache  # noqa: E402,F401 (codetune_cache is a fixture)

from codetune.config import ModelConfig  # noqa: E402

API_KEY = "sk-test-key"
MODEL = "tiny-tuned"


@dataclass
class Server:
    base_url: str
    port: int
    engine: object
    limits: object
    http: object  # the uvicorn.Server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):  # after the autouse codetune_cache
    from codetune.export.generate import load_for_inference

    adapter = build_tiny_adapter(tmp_path_factory.mktemp("run") / "adapter")
    return load_for_inference(ModelConfig(), str(adapter), torch.device("cpu"))[:2]


@contextmanager
def running_server(model, tok, limits, run_info=None):
    """The real app, with the uvicorn settings `codetune serve` uses, on a loopback port picked by the
    OS, in a background thread; `run_info` as an adapter's codetune.json (how its chat rows were rendered)."""
    import uvicorn

    from codetune.serve.app import create_app
    from codetune.serve.engine import Engine
    from codetune.serve.guard import uvicorn_config

    engine = Engine(model, tok, max_pending=limits.max_pending)
    app = create_app(engine, MODEL, limits, api_key=API_KEY, run_info=run_info)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", backlog=1024))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield Server(f"http://127.0.0.1:{port}", port, engine, limits, srv)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        engine.close()
        sock.close()


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
