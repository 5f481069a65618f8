"""What the serve tests share besides fixtures: the served model's name, the API key and the real app
running on a loopback port. A module of its own (not conftest.py): `from conftest import` resolves to
whichever conftest pytest imported first, so it broke when tests/serve ran beside another folder's tests."""

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

API_KEY = "sk-test-key"
MODEL = "tiny-tuned"


@dataclass
class Server:
    base_url: str
    port: int
    engine: object
    limits: object
    http: object  # the uvicorn.Server


@contextmanager
def running_server(model, tok, limits, run_info=None, **engine_kw):
    """The real app, with the uvicorn settings `codetune serve` uses, on a loopback port picked by the
    OS, in a background thread; `run_info` as an adapter's codetune.json (how its chat rows were rendered);
    `engine_kw` to the Engine (e.g. max_batch)."""
    import uvicorn

    from codetune.serve.app import create_app
    from codetune.serve.engine import Engine
    from codetune.serve.guard import uvicorn_config

    engine = Engine(model, tok, max_pending=limits.max_pending, **engine_kw)
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
