"""`codetune serve`: an OpenAI-compatible completions server for one model, so editors and tools that
speak OpenAI's API (Continue, Tabby-style clients, the `openai` package) can use a fine-tuned model.

Routes: POST /v1/completions (prompt or fill-in-the-middle through `suffix`), POST /v1/chat/completions
(a conversation, rendered as training rendered chat rows: jobs.py), both streaming as server-sent events;
POST /infill (llama.cpp's fill-in-the-middle, which editor plugins such as llama.vim and llama.vscode send;
not streamed); GET /v1/models, GET /health. Requests queue through one engine worker (engine.py; with --max-batch
they decode together in one running batch, batching.py) and stop generating
when their client disconnects; request fields, token budgets and choice counts are checked
(schemas.py); connections, headers and bodies are bounded in time and size (guard.py); every limit is
a flag (limits.py); errors are JSON in OpenAI's shape.
FastAPI and uvicorn are imported only when serving: they are the optional `serve` extra.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations (Request)
# at run time, and they are imported inside create_app so FastAPI stays an optional dependency.
import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import json
import os
import sys
import time
import uuid

from codetune.export.static_decode import DECODE_FLAG
from codetune.serve.batching import BATCH_CONTEXT_HELP, MAX_BATCH_HELP
from codetune.serve.limits import RETRY_AFTER_S, Limits, limit_cli_flags, limits_from_args
from codetune.serve.schemas import ApiError

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
    *limit_cli_flags(),
    (("--device",), dict(default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")),
    DECODE_FLAG,
    (("--max-batch",), dict(type=int, default=1, metavar="N", help=f"{MAX_BATCH_HELP} (default: 1)")),
    (("--batch-context",), dict(type=int, default=None, metavar="POSITIONS", help=BATCH_CONTEXT_HELP)),
    (("--reuse-prefix",), dict(action="store_true", help="keep the last request's keys and values and read only "
                               "what a new prompt adds after their shared start (an editor's requests as you type "
                               "share the file before the cursor); one request at a time, static KV cache "
                               "(--decode static or graph); equal to a full prefill to rounding; experimental, "
                               "unmeasured on a GPU (default: off)")),
]


@dataclasses.dataclass
class Timing:
    """Where a non-streamed request's time went on the server, as a standard Server-Timing header (ms):
    `prepare` (parsing, checks and tokenizing, to the job's submission), `prompt` (the prompt's forward
    pass, to the first token), `decode` (the tokens after it), `total` (arrival to the response's body,
    so total - prompt - decode is queueing and the server's own overhead). For the first choice; what a
    client measures beyond `total` is HTTP and its own (bench/serve_latency.py reports both)."""
    arrived: float
    response: object  # fastapi.Response: its headers go out with the JSON body

    def report(self, submitted: float, done: list) -> None:
        c = done[0]
        parts = {"prepare": submitted - self.arrived, "prompt": c.prefill_s, "decode": c.decode_s,
                 "total": time.perf_counter() - self.arrived}
        self.response.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.2f}" for k, v in parts.items())


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine, model_name: str = "codetune", limits: Limits | None = None, api_key: str | None = None,
               run_info: dict | None = None):
    """A FastAPI app serving `engine`'s model under the id `model_name`; `run_info` is the adapter's
    codetune.json (it says how its chat rows were rendered), {} for a model alone."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from codetune.export.sampling import Completion
    from codetune.serve.engine import Busy
    from codetune.serve.guard import RequestGuard, log, peer
    from codetune.serve.jobs import chat_job, chat_support, completion_job, infill_job
    from codetune.serve.responses import ChatShape, TextShape, infill_result, only_fields
    from codetune.serve.schemas import (
        ChatCompletionRequest,
        CompletionRequest,
        InfillRequest,
        check_prompt_bytes,
        check_request,
        max_tokens_of,
        parse_request,
    )

    limits = limits or Limits()
    context = engine.context
    chat = chat_support(engine.tokenizer, run_info or {})
    created = int(time.time())
    app = FastAPI(title="codetune", docs_url=None, redoc_url=None)
    # outermost of the app's own layers: it reads (and bounds) the body before any route runs, and
    # turns an exception no handler took into a generic 500 that keeps the connection
    app.add_middleware(RequestGuard, limits=limits)

    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    @app.exception_handler(HTTPException)
    async def http_error(_req, e: HTTPException):  # unknown routes, wrong methods: same JSON shape
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req, e: RequestValidationError):  # path parameters; no input echoed
        fields = ", ".join(".".join(str(x) for x in err["loc"]) for err in e.errors())
        return JSONResponse(ApiError(400, f"invalid request: {fields}").body(), status_code=400)

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

    def submit(prompts, params, on_text=None):
        try:
            return engine.submit(prompts, params, on_text)
        except Busy as e:
            raise ApiError(503, f"server busy: {e}", type="server_error", code="server_busy",
                           retry_after=RETRY_AFTER_S) from None

    async def client_gone(request: Request) -> None:
        # After the body, the only message uvicorn delivers is the disconnect (or the end of the response)
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def first_of(request: Request, job, future, timeout: float | None) -> str:
        """"done" when `future` (one of the job's) resolves, "gone" when the client disconnects first,
        "late" when `timeout` passes first. The engine's futures are never cancelled from here."""
        done, gone = asyncio.wrap_future(future), asyncio.ensure_future(client_gone(request))
        try:
            finished, _ = await asyncio.wait({done, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is shutting down
            engine.abandon(job)
            raise
        finally:
            gone.cancel()
        return "done" if done in finished else "gone" if gone in finished else "late"

    async def wait_for_worker(request: Request, job) -> bool:
        """Until the worker takes the job up; False if the client left first. A job still queued after
        --queue-timeout is withdrawn and answered 503."""
        outcome = await first_of(request, job, job.started, limits.queue_timeout)
        if outcome == "gone":
            engine.abandon(job)
            log.info("%s disconnected while its request was queued; dropped it", peer(request.client))
            return False
        if outcome == "late" and engine.withdraw(job):
            log.info("%s waited %g s in the queue (--queue-timeout); answered 503", peer(request.client),
                     limits.queue_timeout)
            raise ApiError(503, f"server busy: the request waited {limits.queue_timeout:g} s in the queue "
                                f"({engine.pending} waiting); retry shortly", type="server_error",
                           code="server_busy", retry_after=RETRY_AFTER_S)
        return True  # started (perhaps just as the timeout passed)

    def checked(request_body: bytes, kind):
        req = parse_request(request_body, kind)
        check_request(req, limits)
        if req.model is not None and req.model != model_name:  # (None: /infill, which names no model)
            raise ApiError(404, f"model {req.model!r} does not exist; this server has {model_name!r} "
                                "(see /v1/models)", param="model", code="model_not_found")
        return req

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request, response: Response):
        arrived = time.perf_counter()
        req = checked(await request.body(), CompletionRequest)
        check_prompt_bytes(req, max_tokens_of(req, limits), context, limits)
        # tokenizing up to a MiB of prompt should not stall the event loop
        spec = await asyncio.to_thread(completion_job, req, engine.tokenizer, limits, context)
        return await respond(request, req, spec, TextShape(), Timing(arrived, response))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request, response: Response):
        arrived = time.perf_counter()
        req = checked(await request.body(), ChatCompletionRequest)
        if chat.refusal is not None:
            raise ApiError(400, chat.refusal, param="model", code="no_chat_template")
        check_prompt_bytes(req, max_tokens_of(req, limits), context, limits)
        spec = await asyncio.to_thread(chat_job, req, engine.tokenizer, chat.rendering, limits, context)
        return await respond(request, req, spec, ChatShape(), Timing(arrived, response))

    @app.post("/infill", dependencies=[Depends(authorize)])
    async def infill(request: Request):
        req = checked(await request.body(), InfillRequest)
        if req.stream:
            raise ApiError(400, "stream is not supported on /infill; send \"stream\": false, or use /v1/completions "
                                "with a suffix to stream", param="stream")
        if req.n_predict == 0:  # a plugin's "read this context ahead" call: without a prompt cache, nothing to do
            return only_fields(infill_result(Completion("", "length", 0, 0), 0, model_name, False),
                               req.response_fields)
        spec, cut = await asyncio.to_thread(infill_job, req, engine.tokenizer, limits, context)
        job = submit(spec.prompts, spec.params)
        if not await wait_for_worker(request, job):
            return Response(status_code=499)  # never sent: the client has gone
        if await first_of(request, job, job.future, None) == "gone":
            engine.abandon(job)
            log.info("%s disconnected; stopped generating for it", peer(request.client))
            return Response(status_code=499)
        results = [only_fields(infill_result(c, i, model_name, cut), req.response_fields)
                   for i, c in enumerate(job.future.result())]
        return results[0] if len(results) == 1 else results  # llama.cpp answers n_cmpl > 1 with a list

    async def respond(request: Request, req, spec, shape, timing: "Timing"):
        head = {"id": f"{shape.id_prefix}{uuid.uuid4().hex}", "object": shape.object, "created": int(time.time()),
                "model": model_name}
        gone = Response(status_code=499)  # never sent (the client has gone); nginx's code, for the record
        if req.stream:
            loop, pieces = asyncio.get_running_loop(), asyncio.Queue()

            def put(item) -> None:  # called from the engine thread
                try:
                    loop.call_soon_threadsafe(pieces.put_nowait, item)
                except RuntimeError:  # the event loop closed (server shutting down)
                    pass

            job = submit(spec.prompts, spec.params, on_text=lambda i, piece: put((i, piece)))
            job.future.add_done_callback(lambda _f: put(None))
            # the response starts once the job does, so a full queue or a queue timeout is still a 503
            if not await wait_for_worker(request, job):
                return gone
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(request, dict(head, object=shape.chunk_object), shape, job, pieces,
                                            spec.prompt_tokens, include_usage), media_type="text/event-stream")
        submitted = time.perf_counter()
        job = submit(spec.prompts, spec.params)
        if not await wait_for_worker(request, job):
            return gone
        if await first_of(request, job, job.future, None) == "gone":
            engine.abandon(job)
            log.info("%s disconnected; stopped generating for it", peer(request.client))
            return gone
        done = job.future.result()  # a generation error propagates: RequestGuard answers a generic 500
        timing.report(submitted, done)
        return dict(head, choices=[shape.choice(i, c) for i, c in enumerate(done)],
                    usage=usage(spec.prompt_tokens, done))

    def usage(prompt_tokens: int, done) -> dict:
        completion = sum(c.completion_tokens for c in done)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def stream(request, head, shape, job, pieces: asyncio.Queue, prompt_tokens: int, include_usage: bool):
        finished = False
        try:
            for i in range(len(job.prompts)):
                if (opening := shape.opening(i)) is not None:
                    yield _sse(dict(head, choices=[opening]))
            while (item := await pieces.get()) is not None:
                i, piece = item
                yield _sse(dict(head, choices=[shape.piece(i, piece)]))
            try:
                done = job.future.result()
            except Exception:  # headers are sent already: report in-band, as OpenAI does
                log.exception("generation failed for %s", peer(request.client))
                finished = True
                yield _sse(ApiError(500, "generation failed (the server's log has the details)",
                                    type="server_error").body())
                return
            for i, c in enumerate(done):
                yield _sse(dict(head, choices=[shape.end(i, c.finish_reason)]))
            if include_usage:
                yield _sse(dict(head, choices=[], usage=usage(prompt_tokens, done)))
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # client gone or stream over: stop generating for it
            if not finished:
                log.info("%s disconnected mid-stream; stopped generating for it", peer(request.client))

    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def engine_decoding(model, ns: argparse.Namespace) -> dict:
    """The Engine's decoding arguments from --decode, --max-batch and --batch-context; ConfigError (one
    line, naming the fix) for a combination that cannot run. The running batch captures CUDA graphs on
    CUDA unless --decode static says not to (exact or fall back, as --decode graph)."""
    from codetune.config import ConfigError
    from codetune.export.generate import make_decoder
    from codetune.export.sampling import max_context
    from codetune.serve.batching import check_batching

    if ns.max_batch < 1:
        raise ConfigError(f"--max-batch={ns.max_batch}: must be at least 1 (1 = one request at a time)")
    if ns.max_batch == 1:
        if ns.batch_context is not None:
            raise ConfigError("--batch-context sizes the running batch: use it with --max-batch above 1")
        return dict(decoder=make_decoder(model, ns.decode, reuse_prefix=ns.reuse_prefix))
    if ns.reuse_prefix:
        raise ConfigError("--reuse-prefix keeps one request's cache: use it with --max-batch 1")
    if ns.batch_context is not None and not 1 <= ns.batch_context <= max_context(model):
        raise ConfigError(f"--batch-context={ns.batch_context}: must be between 1 and the model's context "
                          f"({max_context(model)})")
    make_decoder(model, ns.decode)  # the same refusals as one at a time (e.g. --decode graph off CUDA)
    try:
        check_batching(model, ns.decode)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    on_cuda = model.get_input_embeddings().weight.device.type == "cuda"
    return dict(max_batch=ns.max_batch, batch_context=ns.batch_context,
                batch_graphs=on_cuda and ns.decode != "static")


def run(cfgs: dict, ns: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("codetune serve needs FastAPI and uvicorn: pip install 'codetune[serve]'", file=sys.stderr)
        return 2
    from codetune.export.generate import load_for_inference
    from codetune.model.load import pick_device
    from codetune.serve.engine import Engine
    from codetune.serve.guard import fit_connections, log_config, raise_open_file_limit, uvicorn_config
    from codetune.serve.jobs import chat_support

    limits = limits_from_args(ns)
    open_files = raise_open_file_limit()
    fitted = fit_connections(limits.max_connections, open_files)
    if fitted.lowered:
        print(f"codetune serve: warning: --max-connections={limits.max_connections} does not fit the open-file "
              f"limit ({open_files}, `ulimit -n`); serving at most {fitted.max_connections} connections",
              file=sys.stderr)
        limits = dataclasses.replace(limits, max_connections=fitted.max_connections)
    api_key = ns.api_key or os.environ.get("CODETUNE_API_KEY") or None
    if not is_loopback(ns.host) and not api_key:
        print(f"codetune serve: warning: listening on {ns.host} without --api-key; anyone who can reach this "
              "address can use the model", file=sys.stderr)
    model, tok, info = load_for_inference(cfgs["model"], ns.adapter, pick_device(ns.device),
                                          model_cfg_given=hasattr(ns, "model.model"))
    engine = Engine(model, tok, max_pending=limits.max_pending, **engine_decoding(model, ns))
    app = create_app(engine, ns.served_model_name, limits, api_key, run_info=info)
    print(f"codetune serve: model {ns.served_model_name!r} at http://{ns.host}:{ns.port}/v1", file=sys.stderr)
    print(f"codetune serve: decoding: {engine.describe()}", file=sys.stderr)
    print(f"codetune serve: chat: {chat_support(tok, info).describe()}", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn_config(app, limits, host=ns.host, port=ns.port, backlog=fitted.backlog,
                                      log_level="info", log_config=log_config())).run()
    finally:
        engine.close()
    return 0
