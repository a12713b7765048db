"""``create_app(engine, ...)``: the FastAPI application of ``dgemma serve``.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /`` (the playground page). The app owns one
``EngineCore`` on a ``CoreWorker`` thread, started with the app (or by the first request) and stopped with it.

Limits and errors: with ``api_key`` every route but ``/health`` needs ``Authorization: Bearer <key>`` (401);
a body over ``limits.max_body_bytes`` is a 413; every malformed request (bad JSON, wrong types, missing
fields, invalid sampling options, too many tokens or choices) is a 4xx whose body is OpenAI's
``{"error": {"message", "type", "param", "code"}}``; a full waiting queue is a 429 with ``Retry-After``.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgemma.params import SamplingParams
from dgemma.server import handlers
from dgemma.server.metrics import ServerMetrics
from dgemma.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest, Limits
from dgemma.server.worker import CoreWorker

log = logging.getLogger("dgemma.server")
EMBEDDED_ID = "dgemma-sudoku"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
PLACEHOLDER = ("<!doctype html><title>dgemma</title><h1>dgemma</h1><p>The playground page is not installed; "
               "the API is at <code>/v1/chat/completions</code> and <code>/v1/completions</code>.</p>")


@dataclass
class Server:
    """What the handlers share: the engine (tokenizer, decoding), its core on a worker thread, the limits."""

    engine: Any
    core: Any
    worker: CoreWorker
    metrics: ServerMetrics
    limits: Limits
    defaults: SamplingParams
    model_id: str
    api_key: str | None


def model_id_for(source: str | None) -> str:
    """The id /v1/models lists: a checkpoint directory's name, a Hub id as given, or the embedded model's."""
    if not source:
        return EMBEDDED_ID
    path = Path(source)
    return path.resolve().name if path.exists() else source


def create_app(engine, *, model_id: str | None = None, max_num_seqs: int = 16, kv_cache_gb: float | None = None,
               max_queue: int | None = None, api_key: str | None = None, limits: Limits | None = None,
               defaults: SamplingParams | None = None, core=None, max_model_len: int | None = None) -> FastAPI:
    """The server app for ``engine``. ``core``: an EngineCore to use instead of building one (tests)."""
    if core is None:
        from dgemma.core import EngineCore

        kv = None if kv_cache_gb is None else int(kv_cache_gb * 2**30)
        core = EngineCore(engine.runner, max_num_seqs=max_num_seqs, kv_cache_bytes=kv, pad_id=engine.pad_id,
                          max_model_len=max_model_len)
    limits = limits or Limits()
    if max_queue is not None or limits.max_queue is None:
        limits = replace(limits, max_queue=max_queue if max_queue is not None else 4 * max_num_seqs)
    worker = CoreWorker(core, capacity=getattr(core, "num_slots", max_num_seqs))
    metrics = ServerMetrics(queue_depth=worker.queue_depth, running=worker.running)
    worker.metrics = metrics
    server = Server(engine, core, worker, metrics, limits, defaults or engine.params(), model_id or EMBEDDED_ID,
                    api_key)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API for block-diffusion language models (DiffusionGemma).")
    app.state.server = server
    _error_handlers(app, server)
    _routes(app, server)
    app.add_middleware(_Guard, api_key=api_key, max_body=limits.max_body_bytes)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    def model_card() -> dict[str, Any]:
        return {"id": server.model_id, "object": "model", "created": 0, "owned_by": "dgemma"}

    @app.get("/health")
    async def health():
        if server.worker.started and not server.worker.alive:
            raise ApiError(503, "the engine thread has stopped", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != server.model_id:
            raise ApiError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        page = resources.files("dgemma.server").joinpath("static", "playground.html")
        return HTMLResponse(page.read_text(encoding="utf-8") if page.is_file() else PLACEHOLDER)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _generate(server, request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _generate(server, request, body, chat=False)


async def _generate(server: Server, request: Request, body, chat: bool):
    run = handlers.start(server, request, body, chat)
    if body.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    out = await run.complete(request)
    if out is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    return JSONResponse(out)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _error_handlers(app: FastAPI, server: Server) -> None:
    def rejected(request: Request, status: int) -> None:
        if request.url.path in GENERATION_PATHS and 400 <= status < 500:
            server.metrics.request("rejected")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        rejected(request, err.status)
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        rejected(request, 400)
        return _error(validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if isinstance(err.__cause__, _TooLarge):  # FastAPI turns a failed body read into a 400
            err = StarletteHTTPException(413)
        rejected(request, err.status_code)
        if err.status_code == 413:
            return _error(_too_large(server.limits.max_body_bytes))
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return _error(ApiError(err.status_code, message, headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(ApiError(500, f"internal error: {type(err).__name__}", type="server_error"))


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's validation errors as one OpenAI-style 400: the first problem, named by its field."""
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union's failed branches appear as extra path parts ("str", "list[TextPart]"): keep the field path
    loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool", "dict")]
    param = ".".join(loc) or None
    where = f"{param}: " if param else "body: "
    return ApiError(400, where + str(first.get("msg", "invalid value")), param=param)


class _TooLarge(Exception):
    pass


class _Guard:
    """ASGI wrapper in front of the app: the API key check and the body size limit (both before any parsing)."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path") != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await _send_error(send, ApiError(401, "missing or wrong API key: send Authorization: "
                                                             "Bearer <key>", code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _send_error(send, ApiError(400, "the Content-Length header is not a number"))
            if int(length) > self.max_body:
                return await _send_error(send, _too_large(self.max_body))
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await _send_error(send, _too_large(self.max_body))


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="request_too_large")


async def _send_error(send, err: ApiError) -> None:
    response = _error(err)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
