"""`codetune serve` as a user starts it: a subprocess on a loopback port, key from the environment."""

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
from tiny_adapter import build_tiny_adapter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(tmp_path):
    adapter = build_tiny_adapter(tmp_path / "run" / "adapter")
    port = _free_port()
    env = dict(os.environ, CODETUNE_API_KEY="sk-env")
    proc = subprocess.Popen([sys.executable, "-m", "codetune", "serve", "--adapter", str(adapter), "--port",
                             str(port), "--device", "cpu", "--served-model-name", "mine"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-env", max_retries=0)
        r = client.completions.create(model="mine", prompt="def f(", max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
