"""Clients that leave, wait too long, or send too slowly or too much: the worker stops generating for a
client that has gone, a queued request times out with a 503, a half-sent request is dropped, and a
prompt too long in bytes is refused without being tokenised. All traffic stays on 127.0.0.1."""

import json
import logging
import socket
import time

import httpx
import pytest
from serve_support import API_KEY, MODEL, running_server

from codetune.serve.limits import Limits

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = {"model": MODEL, "prompt": "def main():", "max_tokens": 1000, "temperature": 0}


@pytest.fixture(scope="module")
def strict(tiny_model):
    """A server with short deadlines, so the tests wait fractions of a second for them."""
    limits = Limits(max_tokens=1000, max_pending=8, queue_timeout=0.5, header_timeout=0.5, body_timeout=0.5,
                    keep_alive_timeout=5.0, max_body_bytes=64 * 1024, prompt_bytes_per_token=2,
                    max_connections=8)
    with running_server(*tiny_model, limits) as srv:
        yield srv


def _post_bytes(body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw


def _until(condition, timeout: float, step: float = 0.02) -> float:
    """Seconds until condition() held; fails after `timeout`."""
    t0 = time.perf_counter()
    while not condition():
        assert time.perf_counter() - t0 < timeout, "timed out waiting"
        time.sleep(step)
    return time.perf_counter() - t0


def _closed_within(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    sock.settimeout(timeout)
    t0, got = time.perf_counter(), b""
    while chunk := sock.recv(65536):  # socket.timeout here fails the test: the server kept it open
        got += chunk
    return got, time.perf_counter() - t0


def _start_long_job(srv, settle: float = 0.3) -> socket.socket:
    """A raw-socket request for 1000 tokens, returned `settle` s after the worker started on it."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(_post_bytes(LONG))
    _until(lambda: srv.engine.pending == 1, 10, step=0.005)
    time.sleep(settle)
    return sock


def test_abandoned_request_stops_generating(server, caplog):
    """Issue 14 item 12: a non-streaming request whose client hangs up frees the worker at the next token
    (it used to run to max_tokens while the next request waited 28-156 s)."""
    caplog.set_level(logging.INFO, logger="codetune.serve")
    assert server.engine.pending == 0
    before = server.engine.tokens_generated
    sock = _start_long_job(server, settle=0.1)
    assert server.engine.pending == 1, "the long request ended before the hang-up: the test proves nothing"
    sock.close()
    freed = _until(lambda: server.engine.pending == 0, 20)
    generated = server.engine.tokens_generated - before
    print(f"worker freed {freed:.2f}s after the hang-up, {generated} of {LONG['max_tokens']} tokens generated")
    assert generated < LONG["max_tokens"] // 2
    t0 = time.perf_counter()
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{server.base_url}/v1/completions", json=dict(LONG, max_tokens=2), headers=AUTH)
    assert r.status_code == 200 and time.perf_counter() - t0 < 10
    gone = [rec for rec in caplog.records if "disconnected" in rec.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None, [rec.getMessage() for rec in gone]


def test_disconnected_stream_stops_generating(server, caplog):
    """A client that hangs up mid-stream frees the worker instead of leaving it writing 1000 tokens."""
    caplog.set_level(logging.INFO, logger="codetune.serve")
    before = server.engine.tokens_generated
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{server.base_url}/v1/completions", json=dict(LONG, stream=True),
                      headers=AUTH) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
    freed = _until(lambda: server.engine.pending == 0, 20)
    generated = server.engine.tokens_generated - before
    print(f"worker freed {freed:.2f}s after the hang-up, {generated} tokens generated")
    assert generated < LONG["max_tokens"] // 2
    gone = [rec for rec in caplog.records if "disconnected" in rec.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None, [rec.getMessage() for rec in gone]


@pytest.mark.parametrize("stream", [False, True])
def test_queue_timeout_is_503_with_retry_after(strict, stream):
    busy = _start_long_job(strict, settle=0.05)  # the queue timeout must pass while it still runs
    try:
        t0 = time.perf_counter()
        with httpx.Client(timeout=30) as c:
            r = c.post(f"{strict.base_url}/v1/completions", json=dict(LONG, stream=stream), headers=AUTH)
        waited = time.perf_counter() - t0
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "server_busy"
        assert strict.limits.queue_timeout <= waited < strict.limits.queue_timeout + 5
        # withdrawn from the queue, not merely answered: only the long job is left
        assert strict.engine.pending == 1
    finally:
        busy.close()
    _until(lambda: strict.engine.pending == 0, 20)
    after = strict.engine.tokens_generated
    time.sleep(0.3)
    assert (strict.engine.pending, strict.engine.tokens_generated) == (0, after), "the 503'd request ran"


@pytest.mark.parametrize("sent", [b"", b"POST /v1/compl", b"GET /health HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half a request line", "headers without their end"])
def test_half_sent_headers_are_dropped(strict, sent, caplog):
    caplog.set_level(logging.INFO, logger="codetune.serve")
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        sock.sendall(sent)
        got, took = _closed_within(sock, 10)
    assert got == b"" and strict.limits.header_timeout * 0.8 <= took < strict.limits.header_timeout + 3
    assert any("no complete request headers" in rec.getMessage() for rec in caplog.records)
    assert httpx.get(f"{strict.base_url}/health", timeout=10).status_code == 200


def test_endless_headers_are_refused_at_the_size_limit(strict):
    """Headers still incomplete past --max-header-bytes are refused at once, not buffered up to the
    header deadline."""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        filler = b"x" * (strict.limits.max_header_bytes + 1)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: " + filler)
        got, took = _closed_within(sock, 10)
    assert got.startswith(b"HTTP/1.1 400") and took < strict.limits.header_timeout


def test_trickled_next_request_is_dropped(strict):
    """After a response, one byte of a next request stops uvicorn's keep-alive timer; the header deadline
    still holds."""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"}"):  # the whole JSON response, which may come in pieces
            chunk = sock.recv(65536)  # the socket's 10 s timeout bounds each wait
            assert chunk, f"closed mid-response: {got!r}"
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")
        sock.sendall(b"G")
        got, took = _closed_within(sock, 10)
    assert got == b"" and took < strict.limits.header_timeout + 3


def test_half_sent_body_gets_408_and_is_closed(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        sock.sendall(_post_bytes({"model": MODEL, "prompt": "x" * 100})[:-50])
        got, took = _closed_within(sock, 10)
    assert got.startswith(b"HTTP/1.1 408") and b"request body not received" in got
    assert took < strict.limits.body_timeout + 3


def test_chunked_body_over_the_limit_is_cut_off(strict):
    """Without a Content-Length the body is counted as it arrives and refused at the limit."""
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 8192
        for _ in range(strict.limits.max_body_bytes // len(chunk) + 1):  # just past the limit, no end
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        got, _ = _closed_within(sock, 10)
    assert got.startswith(b"HTTP/1.1 413")


def test_connection_cap(tiny_model):
    """The request on the connection that reaches --max-connections gets 503; a connection past it is
    closed at once rather than held until the header deadline (a flood of idle connections must not
    use up the open-file limit)."""
    limits = Limits(max_connections=4, header_timeout=5.0)
    with running_server(*tiny_model, limits) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(3)]
        try:
            _until(lambda: len(srv.http.server_state.connections) == 3, 5)
            with httpx.Client(timeout=10) as c:
                assert c.get(f"{srv.base_url}/health").status_code == 503  # the 4th connection
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
            _until(lambda: len(srv.http.server_state.connections) == 4, 5)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as extra:  # the 5th
                got, took = _closed_within(extra, 10)
            assert got == b"" and took < limits.header_timeout / 2
        finally:
            for s in idle:
                s.close()
        _until(lambda: httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200, 10, step=0.1)


def test_long_prompt_is_refused_before_tokenising(strict, monkeypatch):
    """Issue 14 item 13: a prompt over (context - max_tokens) x --prompt-bytes-per-token bytes is refused
    with context_length_exceeded without reaching the tokenizer."""
    calls = []
    encode = strict.engine.tokenizer.encode
    monkeypatch.setattr(strict.engine.tokenizer, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    room = (4096 - 16) * strict.limits.prompt_bytes_per_token  # tiny-stablelm's context, default max_tokens
    url = f"{strict.base_url}/v1/completions"
    with httpx.Client(timeout=30) as c:
        for body in ({"prompt": "x" * (room + 1)}, {"prompt": "é" * (room // 2), "suffix": "y"},
                     {"prompt": ["ok", "x" * (room + 1)]}):
            r = c.post(url, json=dict(body, model=MODEL), headers=AUTH)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert r.json()["error"]["param"] == "prompt"
        assert calls == [], "an oversized prompt was tokenised"
        r = c.post(url, json={"model": MODEL, "prompt": "x" * 100, "max_tokens": 2}, headers=AUTH)
        assert r.status_code == 200 and calls, "a prompt that fits was not tokenised (the spy is not in the path)"
