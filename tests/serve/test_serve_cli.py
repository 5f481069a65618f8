"""`codetune serve` as a user starts it: a subprocess on a loopback port, key from the environment."""

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from tiny_adapter import build_tiny_adapter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, decoding", [([], "static KV cache"),
                                             (["--max-batch", "2", "--batch-context", "256"],
                                              "continuous batching, 2 rows x 256 positions")])
def test_serve_command(tmp_path, flags, decoding):
    adapter = build_tiny_adapter(tmp_path / "run" / "adapter")
    port = _free_port()
    env = dict(os.environ, CODETUNE_API_KEY="sk-env")
    proc = subprocess.Popen([sys.executable, "-m", "codetune", "serve", "--adapter", str(adapter), "--port",
                             str(port), "--device", "cpu", "--served-model-name", "mine", *flags],
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
    assert f"codetune serve: decoding: {decoding}" in proc.stderr.read()


def test_every_limit_is_a_flag_with_its_default_shown(capsys):
    import pytest

    from codetune.cli import build_parser
    from codetune.serve.limits import LIMIT_FLAGS, Limits

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in LIMIT_FLAGS:
        assert f.flag in shown
        assert f"(default: {getattr(Limits(), f.field)})" in shown.split(f.flag, 2)[-1], f.flag


def test_limits_from_flags_refuse_non_positive_values():
    import pytest

    from codetune.cli import build_parser
    from codetune.config import ConfigError
    from codetune.serve.limits import limits_from_args

    parse = build_parser().parse_args
    limits = limits_from_args(parse(["serve", "--queue-timeout", "2.5", "--max-connections", "9"]))
    assert (limits.queue_timeout, limits.max_connections) == (2.5, 9)
    for flag, value in [("--queue-timeout", "0"), ("--header-timeout", "-1"), ("--body-timeout", "nan"),
                        ("--keep-alive-timeout", "inf"), ("--max-connections", "0"), ("--max-pending", "0")]:
        with pytest.raises(ConfigError, match=flag):
            limits_from_args(parse(["serve", flag, value]))


def test_connection_cap_fits_the_open_file_limit():
    from codetune.serve.guard import BACKLOG, FD_RESERVE, fit_connections

    roomy = fit_connections(512, 1 << 20)
    assert (roomy.max_connections, roomy.backlog, roomy.lowered) == (512, BACKLOG, False)
    tight = fit_connections(512, 256)
    assert tight.lowered and tight.max_connections + tight.backlog <= 256 - FD_RESERVE
    assert tight.max_connections >= 1 and tight.backlog >= 1
    assert fit_connections(512, 10).max_connections >= 1
