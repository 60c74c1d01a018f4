"""The server's FastAPI app: OpenAI endpoints, /health, /metrics, and the engine's life cycle.

Life cycle: the socket opens at once and the model loads in a worker thread (``/health`` and every
endpoint answer 503 meanwhile); once loaded, the engine core runs in its own thread (see
``AsyncLLM``). ``begin_drain`` (called on SIGTERM) refuses new requests with 503 and gives running
ones ``shutdown_timeout`` seconds to finish before aborting them; the lifespan's end stops the
engine thread.

If the engine dies (an internal error in its thread), every request in flight fails at once with a
503, ``/health`` turns 503, the cause is logged, and the server exits with status 1 so a supervisor
restarts it -- or, with ``restart_engine_on_failure``, loads a new engine in place and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tokenmill.engine.async_llm import AsyncLLM, engine_info
from tokenmill.errors import TokenmillError
from tokenmill.gc_policy import collect_everything, freeze_long_lived_objects
from tokenmill.openai_protocol import error_response
from tokenmill.server import dashboard, trace_routes
from tokenmill.server.cost_metrics import CostTracker
from tokenmill.server.error_handlers import install_error_handlers
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.openai import chat, completions, embeddings, models, responses, tokenize
from tokenmill.server.openapi import READ_RESPONSES, install_openapi
from tokenmill.server.request_logger import banner, finished_request_logger
from tokenmill.server.state import ServerSettings, ServerState, server_state
from tokenmill.server.trace_spans import trace_span_hook
from tokenmill.telemetry import TracingMiddleware, otlp_tracer_provider

logger = logging.getLogger("tokenmill.server")

EngineFactory = Callable[[Any], AsyncLLM]


async def _load_engine(app: FastAPI, factory: EngineFactory) -> None:
    state: ServerState = app.state.server
    settings = state.settings
    if settings.engine.model.task == "embed":
        await _load_embedder(app)
        return
    try:
        engine = await asyncio.to_thread(_build_engine, factory, settings.engine)
    except BaseException as exc:  # noqa: BLE001 - reported, and the server told to stop
        state.load_error = exc
        message = exc.message if isinstance(exc, TokenmillError) else repr(exc)
        logger.error("the model failed to load: %s", message)
        on_failure = getattr(app.state, "on_load_failure", None)
        if on_failure is not None:
            on_failure(exc)
        return
    cost = None
    if settings.price_per_hour is not None:
        cost = CostTracker(settings.price_per_hour, settings.cost_window_seconds)
    state.metrics.bind(engine, cost)
    state.history.bind(engine, cost)
    engine.output_listeners.extend([state.metrics.on_step, state.history.on_step,
                                    finished_request_logger(engine.traces)])
    info = engine_info(engine)
    engine.death_listeners.append(lambda error: _on_engine_dead(app, factory, error))
    engine.bind_loop()  # so a death before the first request (a worker lost) is reported too
    state.engine = engine
    state.restarting = False
    logger.info(banner(info, settings.address, settings.engine.resolved_num_threads()))


async def _load_embedder(app: FastAPI) -> None:
    """``--task embed``: a sentence-transformers model instead of the engine."""
    from tokenmill.server.embedding_model import SentenceEmbeddingModel

    state: ServerState = app.state.server
    model = state.settings.engine.model
    try:
        embedder = await asyncio.to_thread(SentenceEmbeddingModel, model.model,
                                           model.served_model_name, model.device)
    except BaseException as exc:  # noqa: BLE001 - reported, and the server told to stop
        state.load_error = exc
        message = exc.message if isinstance(exc, TokenmillError) else repr(exc)
        logger.error("the embedding model failed to load: %s", message)
        on_failure = getattr(app.state, "on_load_failure", None)
        if on_failure is not None:
            on_failure(exc)
        return
    state.embedder = embedder
    logger.info("serving embedding model %s (%s; %d dimensions, inputs up to %d tokens) on "
                "%s/v1/embeddings", embedder.name, embedder.path, embedder.dim,
                embedder.max_seq_length, state.settings.address)


def _build_engine(factory: EngineFactory, config: Any) -> AsyncLLM:
    collect_everything()  # a dead engine's weights and KV pool go before a new one is loaded
    engine = factory(config)
    freeze_long_lived_objects()  # full collections skip what lives as long as the engine
    return engine


def _on_engine_dead(app: FastAPI, factory: EngineFactory, error: BaseException) -> None:
    """Runs on the event loop once the engine has failed every request it held."""
    state: ServerState = app.state.server
    if state.settings.restart_engine_on_failure and not state.draining:
        logger.error("the engine died: %r; loading a new engine (restart_engine_on_failure)",
                     error)
        state.engine, state.restarting = None, True
        app.state.restart_task = asyncio.get_running_loop().create_task(
            _load_engine(app, factory))
        return
    logger.error("the engine died: %r; the server exits with status 1 so that a supervisor can "
                 "restart it (or run it with --restart-engine-on-failure)", error)
    on_dead = getattr(app.state, "on_engine_dead", None)
    if on_dead is not None:
        on_dead(error)


def begin_drain(app: FastAPI) -> asyncio.Task[None]:
    """Stop taking requests; let running ones finish within the shutdown timeout. Idempotent."""
    state: ServerState = app.state.server
    task = getattr(app.state, "drain_task", None)
    if task is None:
        state.draining = True
        timeout = state.settings.shutdown_timeout
        logger.info("shutting down: no new requests; running ones get %.0f s to finish", timeout)
        task = asyncio.get_running_loop().create_task(_drain(state, timeout))
        app.state.drain_task = task
    return task


async def _drain(state: ServerState, timeout: float) -> None:
    if state.engine is not None:
        await state.engine.shutdown(timeout)


def create_app(settings: ServerSettings, engine_factory: EngineFactory = AsyncLLM,
               tracer_provider: Any = None) -> FastAPI:
    """``tracer_provider``: an OpenTelemetry TracerProvider to send spans to (default: an OTLP
    one when ``settings.otlp_endpoint`` is set, else no spans at all)."""
    owns_provider = tracer_provider is None and settings.otlp_endpoint is not None
    if owns_provider:
        tracer_provider = otlp_tracer_provider("tokenmill-server", settings.otlp_endpoint)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        load = asyncio.create_task(_load_engine(app, engine_factory))
        sample_stats = asyncio.create_task(app.state.server.history.run())
        try:
            yield
        finally:
            sample_stats.cancel()
            if not load.done():
                load.cancel()
            await begin_drain(app)
            if owns_provider:
                await asyncio.to_thread(tracer_provider.shutdown)  # flushes what is batched

    app = FastAPI(title="tokenmill", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = ServerState(settings, ServerMetrics())
    install_error_handlers(app)
    install_openapi(app, lambda: app.state.server.engine)
    for module in (completions, chat, responses, embeddings, models, tokenize):
        app.include_router(module.router)
    app.include_router(dashboard.router)  # GET /dashboard and /dashboard/data
    app.include_router(trace_routes.router)  # GET /v1/requests/{id}/trace
    if tracer_provider is not None:  # OpenTelemetry spans
        tracer = tracer_provider.get_tracer("tokenmill.server")
        app.add_middleware(TracingMiddleware, tracer_provider=tracer_provider, service="server",
                           on_finish=trace_span_hook(app, tracer))

    @app.get("/health", responses=READ_RESPONSES)
    async def health(request: Request) -> Response:
        state = server_state(request)
        try:
            state.require_ready()
        except TokenmillError as exc:
            return error_response(exc)
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format."}})
    async def metrics(request: Request) -> Response:
        return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
