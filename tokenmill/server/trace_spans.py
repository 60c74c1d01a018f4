"""OpenTelemetry child spans of a completion request, built from its scheduling trace.

When the HTTP span of a completion or chat request ends (``TracingMiddleware.on_finish``), its
``x-request-id`` names the trace; each engine request in it (one per sample and prompt) becomes an
``engine.request`` span with ``queue`` / ``prefill`` / ``decode`` child spans at the times the
scheduler recorded, a fresh ``queue`` (and ``prefill`` for the recompute) after each preemption,
and every trace event (with its sentence) as a span event. Built after the fact from the trace,
so the engine thread does no OpenTelemetry work at all.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from opentelemetry import trace

from tokenmill.server.trace_routes import find_trace


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def phases(events: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(name, start, end) offsets of the queue / prefill / decode phases of one timeline."""
    result: list[tuple[str, float, float]] = []
    current: tuple[str, float] | None = None
    for event in events:
        kind, t = event["event"], event["t"]
        following = {"queued": "queue", "admitted": "prefill", "resumed": "prefill",
                     "first_token": "decode", "preempted": "queue", "finished": None}
        if kind not in following:
            continue
        if current is not None:
            result.append((current[0], current[1], t))
        name = following[kind]
        current = None if name is None else (name, t)
    if current is not None and events:  # still running: the phase lasts up to the latest event
        last = events[-1]
        result.append((current[0], current[1], last.get("until", last["t"])))
    return result


def add_trace_spans(tracer: trace.Tracer, parent: trace.Span, report: dict[str, Any]) -> None:
    context = trace.set_span_in_context(parent)
    parent.set_attribute("tokenmill.request_id", report["id"])
    parent.set_attribute("tokenmill.trace_summary", report["summary"])
    for child in report["requests"]:
        origin = child["arrival_time"]
        events = child["events"]
        if origin is None or not events:
            continue
        end = max(e.get("until", e["t"]) for e in events)
        span = tracer.start_span("engine.request", context=context, start_time=_ns(origin),
                                 attributes={"tokenmill.request_id": child["id"],
                                             "tokenmill.trace_summary": child["summary"]})
        for event in events:
            attributes = {k: v for k, v in event.items()
                          if isinstance(v, str | int | float | bool) and k not in ("t",)}
            span.add_event(event["event"], attributes=attributes,
                           timestamp=_ns(origin + event["t"]))
        inner = trace.set_span_in_context(span)
        for name, start, stop in phases(events):
            tracer.start_span(name, context=inner, start_time=_ns(origin + start)).end(
                end_time=_ns(origin + stop))
        span.end(end_time=_ns(origin + end))


def trace_span_hook(app: FastAPI, tracer: trace.Tracer) -> Any:
    """``on_finish`` for the server's TracingMiddleware: child spans for traced responses."""
    def on_finish(span: trace.Span, response_headers: dict[str, str]) -> None:
        request_id = response_headers.get("x-request-id")
        engine = app.state.server.engine
        if request_id is None or engine is None:
            return
        report = find_trace(engine.traces, request_id, None)
        if report is not None:
            add_trace_spans(tracer, span, report)
    return on_finish
