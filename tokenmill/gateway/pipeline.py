"""The gateway's one stage signature and the composition that chains the stages once at start-up.

A stage is ``async (request, call_next) -> response``: it may answer by itself (cache hit, refusal
by raising a tokenmill error), change the request before calling ``call_next``, and wrap the
response it gets back (count usage, filter output, store in cache). Streamed answers are an async
iterator of OpenAI chunk dicts that stages wrap generator-in-generator, so nothing buffers the
whole answer and each wrapper's ``finally`` runs when the client goes away.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tokenmill.gateway.config import TenantSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.telemetry import child_span

if TYPE_CHECKING:
    from tokenmill.gateway.rag_store import RagPlan


@dataclass
class GatewayRequest:
    endpoint: str
    """``chat.completions``, ``completions``, ``embeddings`` or ``models``."""
    body: dict[str, Any]
    api_key: str | None
    tenant: TenantSection | None = None
    client_wants_usage: bool = False
    """Whether the caller asked for the streamed usage chunk (the gateway always asks upstream)."""
    estimated_tokens: int = 0
    extra_headers: dict[str, str] = field(default_factory=dict)
    """Headers stages want on the answer (cache tier, RAG sources), hits and misses alike."""
    extra_fields: dict[str, Any] = field(default_factory=dict)
    """Fields stages add to a non-streamed JSON answer."""
    rag: RagPlan | None = None
    """The RAG collection (as loaded, with its version) and top_k, set by ``rag.RagSpecStage``
    before the caches, which key on it."""

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def tenant_name(self) -> str:
        return self.tenant.name if self.tenant else "-"


@dataclass
class GatewayResponse:
    body: dict[str, Any] | None = None
    events: AsyncIterator[dict[str, Any]] | None = None
    status_code: int = 200
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[GatewayRequest], Awaitable[GatewayResponse]]


class Stage(Protocol):
    name: str

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse: ...


def compose(stages: list[Stage], terminal: Handler, metrics: GatewayMetrics) -> Handler:
    """Chain ``stages`` around ``terminal``; each stage's own time (minus what it waits on
    downstream) is observed as ``tokenmill_gateway_stage_seconds{stage}``."""
    handler = terminal
    for stage in reversed(stages):
        handler = _timed(stage, handler, metrics)
    return handler


def _timed(stage: Stage, inner: Handler, metrics: GatewayMetrics) -> Handler:
    async def run(request: GatewayRequest) -> GatewayResponse:
        waited = 0.0

        async def call_next(req: GatewayRequest) -> GatewayResponse:
            nonlocal waited
            t0 = time.perf_counter()
            try:
                return await inner(req)
            finally:
                waited += time.perf_counter() - t0

        start = time.perf_counter()
        try:
            with child_span(f"gateway.{stage.name}"):  # no-op unless OpenTelemetry is on
                return await stage(request, call_next)
        finally:
            metrics.stage_seconds.labels(stage.name).observe(time.perf_counter() - start - waited)

    return run


async def on_close(events: AsyncIterator[dict[str, Any]],
                   callback: Callable[[], None]) -> AsyncIterator[dict[str, Any]]:
    """Pass ``events`` through and call ``callback`` once when the stream ends in any way."""
    try:
        async for event in events:
            yield event
    finally:
        callback()
