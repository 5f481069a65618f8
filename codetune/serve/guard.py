"""What stands between the network and the app: deadlines and size limits per connection and request,
and a last-resort error answer that leaks nothing and keeps the connection.

uvicorn bounds header size and idle keep-alive time, but not how long a client may take to send a
request: a client that sends half a request line (or nothing) holds its connection and file descriptor
forever, and a body can trickle in for hours. Here each request's headers get a deadline (a protocol
that extends uvicorn's h11 one), its body another (RequestGuard, which also caps the body's size while
reading it, instead of after), and the number of connections a cap that fits the open-file limit.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from codetune.serve.limits import Limits
from codetune.serve.schemas import ApiError

log = logging.getLogger("codetune.serve")

# Descriptors kept back from --max-connections: the listening socket, the log, the model's files, the
# tokenizer's and torch's own.
FD_RESERVE = 64
BACKLOG = 2048  # uvicorn's default listen backlog


def peer(client) -> str:
    """(host, port) as the log names it."""
    return f"{client[0]}:{client[1]}" if client else "a client"


async def send_error(send: Callable[[dict], Awaitable[None]], err: ApiError, close: bool = False) -> None:
    """Answer `err` as JSON at the ASGI level (for code outside FastAPI's routes). `close` ends the
    connection after it: a body left half-read cannot be followed by another request."""
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class RequestGuard:
    """ASGI middleware around the app. It reads the body first, in chunks, within --body-timeout (408)
    and --max-body-bytes (413, stopping at the limit), then hands it on as one message; and it answers
    an exception no handler took with a generic 500 (the traceback goes to the log, not the client),
    without re-raising it: uvicorn drops the connection when an exception escapes the app."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await self._read_body(scope, receive)
        except ApiError as e:
            return await send_error(send, e, close=True)
        if body is None:
            return
        started, replayed = False, False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:  # after the body: what the client does next (a disconnect)
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception:
            log.exception("internal error answering %s %s for %s", scope["method"], scope["path"], peer(scope.get("client")))
            if not started:
                await send_error(send, ApiError(500, "internal server error (the server's log has the details)",
                                                type="server_error"))

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None if the client left while sending it."""
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit} (--max-body-bytes)")
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        log.info("%s disconnected while sending its request", peer(scope.get("client")))
                        return None
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise ApiError(413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)")
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            log.info("%s did not send its request body within %g s (--body-timeout); answered 408",
                     peer(scope.get("client")), self.limits.body_timeout)
            raise ApiError(408, f"request body not received within {self.limits.body_timeout:g} s") from None


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers, counted from the moment the
    connection opens or its previous response ends. Past it the connection is closed, with one log line
    (no response can be sent before a request has been read)."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # uvicorn answers 503 to requests on the connection that reaches the cap; past that, a
        # connection is closed at once, so a flood of idle ones cannot hold descriptors until the
        # header deadline
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            log.info("closed the connection from %s: %d connections are open (--max-connections)",
                     peer(self.client), len(self.connections) - 1)
            transport.close()
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request line and headers have been read
            self._headers_in()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start on a pipelined request already buffered
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc) -> None:
        self._headers_in()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._headers_in()
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_late)

    def _headers_in(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.info("closed the connection from %s: no complete request headers within %g s (--header-timeout)",
                     peer(self.client), self._header_timeout)
            self.transport.close()


def uvicorn_config(app, limits: Limits, **kwargs) -> uvicorn.Config:
    """The uvicorn settings that carry `limits`; kwargs (host, port, backlog, log_level, ...) go to
    uvicorn."""
    return uvicorn.Config(app, http=functools.partial(HeaderDeadlineH11, header_timeout=limits.header_timeout),
                          timeout_keep_alive=limits.keep_alive_timeout, limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs)


def log_config() -> dict:
    """uvicorn's logging setup, plus this package's logger on the same handler (one line per event)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["codetune"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit, as Go's runtime does: the usual
    soft default (1024) dates from select() and is far below what a server's connections need. Returns
    the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. above the kernel's nr_open: keep what there is
            pass
    return soft


@dataclass(frozen=True)
class ConnectionBudget:
    max_connections: int
    backlog: int  # uvicorn's listen backlog, which is also how many connections asyncio accepts per tick
    lowered: bool  # max_connections is below what was asked, to fit the open-file limit


def fit_connections(wanted: int, open_files: int) -> ConnectionBudget:
    """Connections and accept backlog that stay under `open_files` (less FD_RESERVE) even when a burst
    of connections arrives at once. A server out of descriptors answers no one, and asyncio (3.11)
    then retries accept() in a loop that logs a traceback per attempt."""
    if open_files == resource.RLIM_INFINITY:
        return ConnectionBudget(wanted, BACKLOG, False)
    budget = max(2, open_files - FD_RESERVE)
    backlog = min(BACKLOG, budget // 2)
    cap = min(wanted, budget - backlog)
    return ConnectionBudget(cap, backlog, cap < wanted)
