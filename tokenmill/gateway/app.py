"""The gateway's FastAPI app: HTTP in and out, and the stage pipelines composed once here.

    chat / completions:  auth → ratelimit → guardrails → rag_spec → exact_cache → semantic_cache
                         → rag → upstream
    embeddings:          auth → ratelimit → local embedding model
    models:              auth → union of the replicas' models the tenant may use

Every tokenmill error becomes an OpenAI-shaped JSON error (``{"error": {message, type, param,
code}}``) with its status code, plus ``Retry-After`` on 429s: ``tokenmill/openai_protocol.py``
writes it, and the SSE events, for the gateway and the server alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.errors import (
    InvalidRequestError,
    RequestTooLargeError,
    TokenmillError,
)
from tokenmill.gateway.auth import AuthStage, can_use_model
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.dashboard import dashboard_router
from tokenmill.gateway.embedding_memo import MemoizedEmbedder
from tokenmill.gateway.embeddings import Embedder, load_embedder
from tokenmill.gateway.exact_cache import ExactCacheStage
from tokenmill.gateway.fleet_stats import FleetHistory
from tokenmill.gateway.guardrails import GuardrailsStage
from tokenmill.gateway.injection_detector import shared_detector
from tokenmill.gateway.llm_features import shared_llm_embedder
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler, Stage, compose
from tokenmill.gateway.protocol import CHAT, COMPLETIONS, is_usage_chunk, validate_body
from tokenmill.gateway.rag import RagSpecStage, RagStage
from tokenmill.gateway.rag_store import RagStore
from tokenmill.gateway.ratelimit import RateLimiter, RateLimitStage
from tokenmill.gateway.router import Router
from tokenmill.gateway.semantic_cache import SemanticCacheStage
from tokenmill.gateway.shared_state import SharedState
from tokenmill.gateway.stragglers import StragglerWatch
from tokenmill.gateway.trace_proxy import fetch_trace
from tokenmill.gateway.upstream import UpstreamStage
from tokenmill.openai_protocol import SSE_DONE, error_response, sse_event, sse_response
from tokenmill.telemetry import TracingMiddleware, otlp_tracer_provider

logger = logging.getLogger("tokenmill.gateway")
_STATE_SAVE_INTERVAL_S = 1.0


@dataclass
class Gateway:
    """Everything one app holds, reachable from tests and benchmarks as ``app.state.gateway``."""

    config: GatewayConfig
    metrics: GatewayMetrics
    limiter: RateLimiter
    shared_state: SharedState
    router: Router
    client: httpx.AsyncClient
    embedder: Embedder
    auth: AuthStage
    stages: list[Stage]
    completions: Handler
    embeddings: Handler
    models: Handler
    stragglers: StragglerWatch


def build_gateway(config: GatewayConfig, *, embedder: Embedder | None = None,
                  transport: httpx.AsyncBaseTransport | None = None) -> Gateway:
    metrics = GatewayMetrics()
    # One request's text is embedded once, however many stages (injection detector, semantic
    # cache, RAG) look at it.
    embedder = MemoizedEmbedder(embedder or load_embedder(config.embeddings.model_path))
    r = config.routing
    client = httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(r.read_timeout_s, connect=r.connect_timeout_s),
        # Replicas are our own servers; many connections per replica keep streams concurrent.
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
    # Memory, or the Redis several gateway processes share (limits, quotas, exact cache).
    shared_state = SharedState(config.shared_state, metrics)
    limiter = RateLimiter(config.tenants, shared_state, config.server.state_file)
    router = Router(config.upstreams, r, metrics)
    auth = AuthStage(config.tenants)
    ratelimit = RateLimitStage(limiter, metrics)
    detector_section = config.guardrails.injection_detector
    detector = None
    if detector_section.enabled:
        llm = shared_llm_embedder() if detector_section.llm_view else None
        detector = shared_detector(embedder, detector_section.exemplars,
                                   detector_section.max_windows, llm=llm,
                                   vector_cache_dir=detector_section.vector_cache_dir,
                                   concepts_path=detector_section.concepts)
    guardrails = GuardrailsStage(config.guardrails, metrics, detector)
    stages: list[Stage] = [auth, ratelimit, guardrails,
                           RagSpecStage(config.rag, RagStore(config.rag.dir, embedder.dim))]
    if config.cache.exact:
        stages.append(ExactCacheStage(config.cache, metrics, shared_state))
    if config.cache.semantic:
        stages.append(SemanticCacheStage(config.cache, embedder, metrics))
    stages.append(RagStage(embedder, screen=guardrails.screen_chunks))
    completions = compose(stages, UpstreamStage(router, client, metrics), metrics)

    async def embed_terminal(request: GatewayRequest) -> GatewayResponse:
        texts = request.body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or \
                not all(isinstance(t, str) and t for t in texts):
            raise InvalidRequestError("'input' must be a non-empty string or list of non-empty "
                                      "strings", param="input")
        vectors = await asyncio.to_thread(embedder.embed, texts)
        num_tokens = request.estimated_tokens
        return GatewayResponse(body={
            "object": "list", "model": config.embeddings.served_name,
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})

    async def models_terminal(request: GatewayRequest) -> GatewayResponse:
        names = [*router.all_models(), config.embeddings.served_name]
        assert request.tenant is not None
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tokenmill"}
                for m in names if can_use_model(request.tenant, m)]
        return GatewayResponse(body={"object": "list", "data": data})

    return Gateway(config, metrics, limiter, shared_state, router, client, embedder, auth, stages, completions,
                   compose([auth, ratelimit], embed_terminal, metrics),
                   compose([auth], models_terminal, metrics),
                   StragglerWatch(router, r, metrics))


def create_app(config: GatewayConfig, *, embedder: Embedder | None = None,
               transport: httpx.AsyncBaseTransport | None = None,
               tracer_provider: Any = None) -> FastAPI:
    """``tracer_provider``: an OpenTelemetry TracerProvider for spans (default: an OTLP one when
    ``server.otlp_endpoint`` is set, else no spans)."""
    gw = build_gateway(config, embedder=embedder, transport=transport)
    fleet = FleetHistory(gw.metrics, gw.router)
    owns_provider = tracer_provider is None and config.server.otlp_endpoint is not None
    if owns_provider:
        tracer_provider = otlp_tracer_provider("tokenmill-gateway", config.server.otlp_endpoint)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.limiter.load()
        await gw.router.check_all(gw.client)
        tasks = [asyncio.create_task(gw.router.health_loop(gw.client))]
        if config.routing.straggler_detection:
            tasks.append(asyncio.create_task(gw.stragglers.run(gw.client)))
        if config.server.expose_metrics:
            tasks.append(asyncio.create_task(fleet.run()))
        if config.server.state_file:
            tasks.append(asyncio.create_task(_save_loop(gw.limiter)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await gw.limiter.save_off_loop()
            await gw.shared_state.aclose()
            await gw.client.aclose()
            if owns_provider:
                await asyncio.to_thread(tracer_provider.shutdown)  # flushes what is batched

    app = FastAPI(title="tokenmill gateway", lifespan=lifespan)
    app.state.gateway = gw
    if tracer_provider is not None:  # OpenTelemetry: a span per request, one per stage inside
        app.add_middleware(TracingMiddleware, tracer_provider=tracer_provider, service="gateway")

    async def handle(endpoint: str, http_request: Request, handler: Handler) -> Response:
        greq = GatewayRequest(endpoint, {}, _bearer(http_request))
        try:
            # Authenticate before reading the body: strangers get 401 and cost no parsing.
            greq.tenant = gw.auth.tenant_for(greq.api_key)
            if endpoint != "models":
                greq.body = await _read_json(http_request, config.server.max_body_bytes)
                if endpoint in (CHAT, COMPLETIONS):
                    validate_body(endpoint, greq.body)
                    greq.client_wants_usage = bool((greq.body.get("stream_options") or {})
                                                   .get("include_usage"))
                elif not isinstance(greq.body, dict):
                    raise InvalidRequestError("the request body must be a JSON object")
            response = await handler(greq)
        except TokenmillError as exc:
            gw.metrics.requests.labels(greq.tenant_name, endpoint, str(exc.status_code)).inc()
            return error_response(exc)
        except Exception:
            logger.exception("gateway bug while handling %s", endpoint)
            gw.metrics.requests.labels(greq.tenant_name, endpoint, "500").inc()
            return error_response(TokenmillError("internal gateway error; see the gateway log"))
        gw.metrics.requests.labels(greq.tenant_name, endpoint, str(response.status_code)).inc()
        headers = {**greq.extra_headers, **response.headers}
        if response.events is None:
            body = response.body or {}
            if response.status_code == 200 and greq.extra_fields:
                body = {**body, **greq.extra_fields}
            return JSONResponse(body, status_code=response.status_code, headers=headers)
        return sse_response(_sse(response.events, greq.client_wants_usage), headers)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await handle(CHAT, request, gw.completions)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(COMPLETIONS, request, gw.completions)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await handle("embeddings", request, gw.embeddings)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await handle("models", request, gw.models)

    @app.get("/v1/requests/{request_id}/trace")
    async def request_trace(request_id: str, request: Request) -> Response:
        """The caller's own request's scheduling timeline, from whichever replica served it."""
        try:
            tenant = gw.auth.tenant_for(_bearer(request))
            trace = await fetch_trace(gw.router, gw.client, request_id, tenant.name)
        except TokenmillError as exc:
            return error_response(exc)
        return JSONResponse(trace)

    @app.get("/health")
    async def health() -> Response:
        now = time.monotonic()
        upstreams = {r.name: r.can_route(now) for r in gw.router.replicas}
        ok = any(upstreams.values())
        return JSONResponse({"status": "ok" if ok else "no_upstream", "upstreams": upstreams},
                            status_code=200 if ok else 503)

    if config.server.expose_metrics:
        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

        app.state.fleet = fleet
        app.include_router(dashboard_router(fleet))  # GET /dashboard and /dashboard/data

    return app


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"request body of {declared} bytes is over the limit of "
                                   f"{limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: Content-Length may be absent
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"request body is over the limit of {limit} bytes",
                                       code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None


async def _sse(events: AsyncIterator[dict[str, Any]], wants_usage: bool) -> AsyncIterator[str]:
    try:
        async for event in events:
            if is_usage_chunk(event) and not wants_usage:
                continue
            yield sse_event(event)
        yield SSE_DONE
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


async def _save_loop(limiter: RateLimiter) -> None:
    while True:
        await asyncio.sleep(_STATE_SAVE_INTERVAL_S)
        await limiter.save_off_loop()  # a file write: never on the event loop
