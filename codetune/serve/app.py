"""`codetune serve`: an OpenAI-compatible completions server for one model, so editors and tools that
speak OpenAI's API (Continue, Tabby-style clients, the `openai` package) can use a fine-tuned model.

Routes: POST /v1/completions (prompt or fill-in-the-middle through `suffix`, streaming as server-sent
events), GET /v1/models, GET /health. Requests queue through one engine worker (engine.py); bodies,
token budgets and choice counts are bounded (schemas.py); errors are JSON in OpenAI's shape.
FastAPI and uvicorn are imported only when serving: they are the optional `serve` extra.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations (Request)
# at run time, and they are imported inside create_app so FastAPI stays an optional dependency.
import argparse
import asyncio
import hmac
import ipaddress
import json
import os
import sys
import time
import uuid

from codetune.config import ConfigError
from codetune.serve.schemas import ApiError, Limits

CLI_FLAGS = [
    (("--adapter",), dict(metavar="DIR", help="adapter directory from `codetune train` (or serve --model alone, "
                                                "e.g. a merged model directory)")),
    (("--host",), dict(default="127.0.0.1", help="address to listen on; loopback by default (use --api-key "
                                                   "before exposing it)")),
    (("--port",), dict(type=int, default=8000, help="TCP port")),
    (("--api-key",), dict(default=None, metavar="KEY",
                          help="require 'Authorization: Bearer KEY'; default: $CODETUNE_API_KEY (safer than a flag, "
                               "which other users can see in the process list); neither = open")),
    (("--served-model-name",), dict(default="codetune", metavar="NAME", help="the model id clients ask for")),
    (("--max-tokens-limit",), dict(type=int, default=1024, help="largest max_tokens a request may ask for")),
    (("--max-choices",), dict(type=int, default=16, help="largest n x prompts per request")),
    (("--max-pending",), dict(type=int, default=1024, help="queued requests before answering 503 busy")),
    (("--max-body-bytes",), dict(type=int, default=1 << 20, help="largest request body")),
    (("--device",), dict(default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")),
]


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine, model_name: str = "codetune", limits: Limits | None = None, api_key: str | None = None):
    """A FastAPI app serving `engine`'s model under the id `model_name`."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from codetune.export.sampling import SamplingParams, fim_ids, max_context, prompt_ids
    from codetune.serve.engine import Busy
    from codetune.serve.schemas import check_request, parse_request, prompt_list, stop_list

    limits = limits or Limits()
    context = max_context(engine.model)
    created = int(time.time())
    app = FastAPI(title="codetune", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_req, e: HTTPException):  # unknown routes, wrong methods: same JSON shape
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, e: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_req, e: Exception):  # e.g. generation failed: still JSON, still OpenAI's shape
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "codetune"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "pending": engine.pending}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limits.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
        return bytes(body)

    def build_job(req) -> tuple[list[list[int]], list[SamplingParams], int]:
        """Token ids and sampling settings per choice, with the context length checked; and the number of
        prompt tokens as OpenAI counts them (each prompt once, whatever n is)."""
        tok, n = engine.tokenizer, req.n or 1
        max_tokens = req.max_tokens or limits.default_max_tokens
        prompts, params, prompt_tokens = [], [], 0
        for text in prompt_list(req):
            ids = fim_ids(tok, text, req.suffix) if req.suffix is not None else prompt_ids(tok, text)
            if len(ids) + max_tokens > context:
                raise ApiError(400, f"This model's maximum context length is {context} tokens, however you "
                                    f"requested {len(ids) + max_tokens} tokens ({len(ids)} in your prompt; "
                                    f"{max_tokens} for the completion). Please reduce your prompt or completion "
                                    "length.", param="prompt", code="context_length_exceeded")
            prompt_tokens += len(ids)
            for _ in range(n):
                seed = None if req.seed is None else req.seed + len(params)
                prompts.append(ids)
                params.append(SamplingParams(
                    max_new_tokens=max_tokens, stop=stop_list(req), seed=seed,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p))
        return prompts, params, prompt_tokens

    def submit(prompts, params, on_text=None):
        try:
            return engine.submit(prompts, params, on_text)
        except Busy as e:
            raise ApiError(503, f"server busy: {e}", type="server_error", code="server_busy") from None

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        req = parse_request(await read_body(request))
        check_request(req, limits)
        if req.model != model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server has {model_name!r} "
                                "(see /v1/models)", param="model", code="model_not_found")
        # tokenizing up to a MiB of prompt should not stall the event loop
        prompts, params, prompt_tokens = await asyncio.to_thread(build_job, req)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if req.stream:
            # submitted before the response starts, so a full queue is still answered with a 503
            loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

            def put(item) -> None:  # called from the engine thread
                try:
                    loop.call_soon_threadsafe(pieces.put_nowait, item)
                except RuntimeError:  # the event loop closed (server shutting down)
                    pass

            job = submit(prompts, params, on_text=lambda i, piece: put((i, piece)))
            job.future.add_done_callback(lambda _f: put(None))
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(head, job, pieces, prompt_tokens, include_usage),
                                     media_type="text/event-stream")
        job = submit(prompts, params)
        try:
            done = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel.set()
            raise
        choices = [{"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(done)]
        return dict(head, choices=choices, usage=usage(prompt_tokens, done))

    def usage(prompt_tokens: int, done) -> dict:
        completion = sum(c.completion_tokens for c in done)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def stream(head, job, pieces: asyncio.Queue, prompt_tokens: int, include_usage: bool):
        try:
            while (item := await pieces.get()) is not None:
                i, piece = item
                yield _sse(dict(head, choices=[{"text": piece, "index": i, "logprobs": None,
                                                "finish_reason": None}]))
            try:
                done = job.future.result()
            except Exception as e:  # headers are sent already: report in-band, as OpenAI does
                yield _sse(ApiError(500, f"generation failed: {e}", type="server_error").body())
                return
            for i, c in enumerate(done):
                yield _sse(dict(head, choices=[{"text": "", "index": i, "logprobs": None,
                                                "finish_reason": c.finish_reason}]))
            if include_usage:
                yield _sse(dict(head, choices=[], usage=usage(prompt_tokens, done)))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # client gone or stream over: stop generating for it

    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(cfgs: dict, ns: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("codetune serve needs FastAPI and uvicorn: pip install 'codetune[serve]'", file=sys.stderr)
        return 2
    from codetune.export.generate import load_for_inference
    from codetune.model.load import pick_device
    from codetune.serve.engine import Engine

    for flag in ("max_tokens_limit", "max_choices", "max_pending", "max_body_bytes"):
        if getattr(ns, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(ns, flag)}: must be at least 1")
    api_key = ns.api_key or os.environ.get("CODETUNE_API_KEY") or None
    if not is_loopback(ns.host) and not api_key:
        print(f"codetune serve: warning: listening on {ns.host} without --api-key; anyone who can reach this "
              "address can use the model", file=sys.stderr)
    model, tok = load_for_inference(cfgs["model"], ns.adapter, pick_device(ns.device),
                                    model_cfg_given=hasattr(ns, "model.model"))
    engine = Engine(model, tok, max_pending=ns.max_pending)
    limits = Limits(max_tokens=ns.max_tokens_limit, max_choices=ns.max_choices, max_body_bytes=ns.max_body_bytes)
    app = create_app(engine, ns.served_model_name, limits, api_key)
    print(f"codetune serve: model {ns.served_model_name!r} at http://{ns.host}:{ns.port}/v1", file=sys.stderr)
    try:
        uvicorn.run(app, host=ns.host, port=ns.port, log_level="info")
    finally:
        engine.close()
    return 0
