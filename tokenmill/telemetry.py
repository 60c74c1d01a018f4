"""OpenTelemetry for the server and the gateway: one span per HTTP request, child spans inside it,
and W3C ``traceparent`` carried from the gateway to the servers.

Off by default and then costs nothing: no middleware is installed and ``child_span`` is a no-op.
It is on when the process is given an OTLP endpoint (``--otlp-endpoint``; the exporter comes from
the ``otlp`` extra, imported only then) or when a caller hands ``create_app`` a ``TracerProvider``
(tests use the SDK's in-memory exporter that way).

The request's tracer travels in a context variable set by ``TracingMiddleware``, so code deep in a
request (a gateway stage) opens child spans without being handed anything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import propagate, trace

from tokenmill.errors import ConfigError

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]
OnFinish = Callable[[trace.Span, dict[str, str]], None]

logger = logging.getLogger(__name__)

_current_tracer: ContextVar[trace.Tracer | None] = ContextVar("tokenmill_tracer", default=None)


def otlp_tracer_provider(service_name: str, endpoint: str) -> Any:
    """An SDK TracerProvider that batches spans to an OTLP/HTTP collector at ``endpoint``
    (e.g. ``http://127.0.0.1:4318/v1/traces``)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError("--otlp-endpoint needs the OTLP exporter: pip install "
                          "'tokenmill[otlp]'", param="otlp_endpoint") from None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


@contextlib.contextmanager
def child_span(name: str, **attributes: Any) -> Iterator[trace.Span | None]:
    """A span under the current one while a traced request runs; nothing otherwise."""
    tracer = _current_tracer.get()
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span


def inject_traceparent(headers: dict[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``) for the current span; nothing when untraced."""
    if _current_tracer.get() is not None:
        propagate.inject(headers)


class TracingMiddleware:
    """Pure ASGI middleware: one SERVER span per HTTP request (the parent taken from an incoming
    ``traceparent``), covering the whole answer including a streamed body. ``on_finish(span,
    response_headers)`` may add child spans before the span ends."""

    def __init__(self, app: ASGIApp, tracer_provider: Any, service: str,
                 on_finish: OnFinish | None = None,
                 skip_paths: tuple[str, ...] = ("/health", "/metrics")) -> None:
        self.app = app
        self.tracer = tracer_provider.get_tracer(f"tokenmill.{service}")
        self.on_finish = on_finish
        self.skip_paths = skip_paths

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] in self.skip_paths:
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = propagate.extract(carrier)
        method, path = scope["method"], scope["path"]
        response_headers: dict[str, str] = {}

        async def send_and_watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                response_headers.update((k.decode("latin-1"), v.decode("latin-1"))
                                        for k, v in message.get("headers", []))
            await send(message)

        with self.tracer.start_as_current_span(
                f"{method} {path}", context=parent, kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": path}) as span:
            token = _current_tracer.set(self.tracer)
            try:
                await self.app(scope, receive, send_and_watch)
            finally:
                _current_tracer.reset(token)
                if self.on_finish is not None:
                    try:
                        self.on_finish(span, response_headers)
                    except Exception:  # a telemetry bug must never fail a request
                        logger.exception("building the request's child spans failed")
