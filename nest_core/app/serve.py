"""``nest serve``: one loaded model over one store, behind an OpenAI-compatible HTTP API.

``POST /v1/chat/completions``, ``POST /v1/responses`` (the Responses API) and
``POST /v1/completions`` (legacy text completions), each plain and SSE streaming;
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus, see
:mod:`~nest_core.app.metrics`). Answers carry their citations (the wire formats:
:mod:`~nest_core.app.openai_api`, :mod:`~nest_core.app.responses_api`,
:mod:`~nest_core.app.completions_api`). A prompt past the model's context window is refused
with 400 unless the request sends ``"truncation": "auto"``.

Capacity is explicit: ``max_concurrent`` answers decode at once (threads share the weights;
with ``--batching`` their forwards run together in shared model calls,
:mod:`~nest_core.batching`), ``max_queue`` more wait for a slot; a request
past that is refused at once with 429, and one that waited ``queue_seconds`` without a slot
gets 503, both with ``Retry-After``. Nothing is dropped silently: every request gets an
answer or an error.
The server has no authentication unless ``api_key`` is set (then ``Authorization: Bearer``
is required on ``/v1/``, compared in constant time; ``/health`` and ``/metrics`` stay open
for probes and scrapers): keep it on loopback or behind your gateway. Even on loopback every
web page its user opens can reach it, so (:mod:`~nest_core.app.guard`) a request whose
``Host`` is not the bound host, a loopback name, an IP address or an ``--allowed-host`` name
gets 400 (DNS rebinding), and a POST that is not ``application/json`` gets 415 (a cross-site
form or ``text/plain`` POST). A client that leaves stops its answer: a stream at once, a
plain request at the answer's next piece (counted as status 499).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    from nest_core.app.metrics import CONTENT_TYPE, MetricsMiddleware, ServeMetrics
except ImportError as err:  # pragma: no cover - exercised only without the extra
    msg = ('nest serve needs FastAPI, uvicorn and prometheus-client; run '
           '`pip install "nest-decoding[serve]"`')
    raise ImportError(msg) from err

from nest_core.app import completions_api, responses_api
from nest_core.app.guard import LOOPBACK_NAMES, RequestGuard, allowed_hosts
from nest_core.app.openai_api import (
    ApiError,
    ChatRequest,
    ChatStream,
    EventStream,
    completion,
    fit_window,
    parse_request,
)
from nest_core.app.schemas import REQUEST_BODIES, components, request_body
from nest_core.app.service import AnswerService
from nest_core.async_iter import aiter_on, close
from nest_core.types import NestChunk, NestResult, Passage

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServeLimits:
    """What one server process accepts (see the module docstring)."""

    max_concurrent: int = 2
    max_queue: int = 8
    queue_seconds: float = 60.0
    max_tokens: int = 512  # most tokens per answer a request may ask for
    default_max_tokens: int = 128
    max_body_bytes: int = 256 * 1024
    max_messages: int = 64

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_queue < 0 or self.queue_seconds <= 0:
            msg = (f"max_concurrent >= 1, max_queue >= 0 and queue_seconds > 0 are needed, "
                   f"got {self.max_concurrent}, {self.max_queue}, {self.queue_seconds}")
            raise ValueError(msg)


class Gate:
    """Admission (``max_concurrent`` decoding + ``max_queue`` waiting) on the event loop."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.inside = 0  # admitted requests: decoding or waiting for a slot
        self.decoding = 0
        self._slots: asyncio.Semaphore | None = None

    def enter(self) -> None:
        capacity = self.limits.max_concurrent + self.limits.max_queue
        if self.inside >= capacity:
            raise ApiError(429, f"the server is at capacity ({self.limits.max_concurrent} "
                                f"answering, {self.limits.max_queue} queued); retry shortly",
                           type="rate_limit_error", code="queue_full")
        self.inside += 1

    async def slot(self) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_concurrent)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.queue_seconds)
        except TimeoutError:
            raise ApiError(503, f"no answer slot came free within "
                                f"{self.limits.queue_seconds:g} s; retry later",
                           type="server_error", code="queue_timeout") from None
        self.decoding += 1

    def leave(self, had_slot: bool) -> None:
        self.inside -= 1
        if had_slot and self._slots is not None:
            self.decoding -= 1
            self._slots.release()


def create_app(service: AnswerService, limits: ServeLimits | None = None,
               api_key: str | None = None, hosts: frozenset[str] | None = None) -> FastAPI:
    """The FastAPI application (``uvicorn`` runs it; tests may call it in-process).
    ``hosts``: the ``Host`` names it answers to (:func:`~nest_core.app.guard.allowed_hosts`;
    ``None``: any, for an app called in-process)."""
    from nest_core import __version__

    limits = limits or ServeLimits()
    gate = Gate(limits)
    # one thread per answer decoding at once (each decodes in one call), whatever the cores
    workers = ThreadPoolExecutor(max_workers=limits.max_concurrent,
                                 thread_name_prefix="nest-answer")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # at shutdown: stop waiting answers; a running one ends when its client is gone
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nest", version=__version__, lifespan=lifespan,
                  summary="Answers grounded in your documents, with their citations")
    _document_bodies(app)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(),
                            status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(err)).body(), status_code=400)

    app.add_middleware(RequestGuard, hosts=hosts, api_key=api_key)
    metrics = ServeMetrics(decoding=lambda: gate.decoding,
                           queued=lambda: gate.inside - gate.decoding,
                           model_forwards=lambda: getattr(service, "model_forwards", None))
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts refusals too

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.name, "decoding": gate.decoding,
                "queued": gate.inside - gate.decoding,
                "capacity": limits.max_concurrent + limits.max_queue}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "nest"}
            for m in service.model_ids]}

    def post(path: str) -> Any:
        """A POST route documented with its body's model (:mod:`.schemas`)."""
        return app.post(path, openapi_extra=request_body(REQUEST_BODIES[path]))

    async def answer(request: Request, req: ChatRequest,
                     plain: Callable[[list[Passage], NestResult], Any],
                     streamed: Callable[[list[Passage]], EventStream]) -> Any:
        """Admit, decode and answer ``req`` in one wire format: ``plain`` builds the
        response body, ``streamed`` the events of a stream. Decoding stops when the client
        leaves (a stream: when its response is cancelled; else: at the next piece)."""
        req = await asyncio.to_thread(_call, fit_window, service.lm, req)
        gate.enter()
        had_slot = handed_off = False
        try:
            await gate.slot()
            had_slot = True
            retrieved, pieces = await asyncio.to_thread(_call, service.stream, req)
            if not req.stream:
                result = await _result_unless_gone(pieces, request, workers)
                if result is None:  # nobody reads the answer: 499, "client closed request"
                    return JSONResponse(ApiError(499, "the client left").body(), 499)
                metrics.answered(result)
                return plain(retrieved, result)
            events = _sse(pieces, streamed(retrieved), lambda: gate.leave(True),
                          metrics.answered, workers)
            handed_off = True  # the stream leaves the gate when it ends
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finally:
            if not handed_off:
                gate.leave(had_slot)

    @post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = parse_request(await _json_body(request, limits.max_body_bytes),
                            model_ids=service.model_ids, max_tokens_limit=limits.max_tokens,
                            default_max_tokens=limits.default_max_tokens,
                            max_messages=limits.max_messages)
        return await answer(request, req,
                            lambda found, result: completion(result, found, service.name),
                            lambda found: ChatStream(req, found, service.name))

    @post("/v1/responses")
    async def responses(request: Request) -> Any:
        req = responses_api.parse_request(
            await _json_body(request, limits.max_body_bytes), model_ids=service.model_ids,
            max_tokens_limit=limits.max_tokens, default_max_tokens=limits.default_max_tokens,
            max_messages=limits.max_messages)
        return await answer(
            request, req, lambda found, result: responses_api.Response(req, found, service.name)
            .body(result), lambda found: responses_api.ResponseStream(req, found, service.name))

    @post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = completions_api.parse_request(
            await _json_body(request, limits.max_body_bytes), model_ids=service.model_ids,
            max_tokens_limit=limits.max_tokens, default_max_tokens=limits.default_max_tokens)
        return await answer(
            request, req,
            lambda found, result: completions_api.completion(result, found, service.name),
            lambda found: completions_api.CompletionStream(req, found, service.name))

    return app


def _document_bodies(app: FastAPI) -> None:
    """``/openapi.json`` with each route's request body schema (:mod:`.schemas`): the
    routes read raw JSON themselves (their size limit and OpenAI-shaped errors), so FastAPI
    cannot see the models; they are added to its document here."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _call(fn: Any, *args: Any) -> Any:
    """Run ``fn``; a failure becomes an OpenAI-shaped error that says what went wrong."""
    try:
        return fn(*args)
    except ApiError:
        raise
    except TimeoutError as err:
        raise ApiError(503, str(err), type="server_error", code="store_timeout") from err
    except (ValueError, TypeError, OSError) as err:
        logger.exception("request failed")
        raise ApiError(500, f"{type(err).__name__}: {err}", type="server_error") from err


async def _json_body(request: Any, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body of {declared} bytes is over this server's "
                            f"{max_bytes}-byte limit", code="request_too_large")
    raw = b""
    async for part in request.stream():
        raw += part
        if len(raw) > max_bytes:
            raise ApiError(413, f"request body is over this server's {max_bytes}-byte limit",
                           code="request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from err
    except RecursionError as err:  # the C parser's depth guard: [[[[...]]]]
        raise ApiError(400, "the request body is nested too deeply to be a request") from err


DISCONNECT_POLL_SECONDS = 0.1  # how often a non-streamed answer checks its client is there


async def _result_unless_gone(pieces: Iterator[NestChunk], request: Request,
                              workers: ThreadPoolExecutor) -> NestResult | None:
    """The answer's result, decoded in one call on one of ``workers`` (a hop to a thread
    per piece cost every decoding step a turn of the event loop, and the loop's default
    pool has ``cpu_count + 4`` threads: 6 answers at most on 2 cores); ``None`` as soon as
    the client has left (polled every :data:`DISCONNECT_POLL_SECONDS`, checked between
    pieces: the decoder stops there, as it does when the route itself is cancelled)."""
    gone = threading.Event()

    def drain() -> NestResult | None:
        try:
            for piece in pieces:
                if piece.result is not None:
                    return piece.result
                if gone.is_set():
                    logger.info("the client left: stopped decoding its answer")
                    return None
            raise AssertionError("stream ended without a result")  # pragma: no cover
        finally:
            close(pieces)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        return await asyncio.get_running_loop().run_in_executor(workers, _call, drain)
    finally:
        gone.set()
        watcher.cancel()


async def _sse(pieces: Iterator[NestChunk], events: EventStream, release: Callable[[], None],
               answered: Callable[[NestResult], None],
               workers: ThreadPoolExecutor) -> AsyncIterator[str]:
    """Server-sent events of one streamed answer in one wire format (``events``), decoded in
    one call on one of ``workers`` (as a non-streamed answer is). A failure mid-answer is
    sent as the format's error event (the status line is already out)."""
    try:
        for event in events.opening():
            yield event
        async with aclosing(aiter_on(workers, pieces)) as stream:  # stops it early too
            async for piece in stream:
                for event in events.text(piece.text) if piece.text else []:
                    yield event
                if piece.result is not None:
                    answered(piece.result)
                    for event in events.closing(piece.result):
                        yield event
    except Exception as err:  # the client must learn that the answer broke off
        logger.exception("stream failed")
        for event in events.failure(ApiError(500, f"{type(err).__name__}: {err}",
                                             type="server_error")):
            yield event
    finally:
        release()


def run(service: AnswerService, *, host: str = "127.0.0.1", port: int = 8000,
        limits: ServeLimits | None = None, api_key: str | None = None,
        allowed: Sequence[str] = ()) -> None:
    """Serve until interrupted (Ctrl-C stops uvicorn cleanly). Requests must name ``host``,
    a loopback name, an IP address or one of ``allowed`` in their ``Host`` header
    (:mod:`~nest_core.app.guard`)."""
    import uvicorn

    if host not in LOOPBACK_NAMES and not api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach this port can "
                       "query your documents", host)
    app = create_app(service, limits, api_key, hosts=allowed_hosts(host, allowed))
    uvicorn.run(app, host=host, port=port, log_level="info")
