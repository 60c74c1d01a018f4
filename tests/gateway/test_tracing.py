"""OpenTelemetry across gateway and server: one client request is one trace, from the gateway's
request span through its stages to the server's request span and the engine phases under it.

Both apps run in this process (uvicorn threads on loopback) with one SDK TracerProvider and its
in-memory exporter; the server runs the real built-in model with a small KV pool.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.gateway.helpers import KEY_BETA, RunningGateway, base_config
from tests.gateway.upstream_server import ServerThread
from tokenmill.config import CacheConfig, EngineConfig, ModelConfig
from tokenmill.gateway.app import create_app as create_gateway
from tokenmill.gateway.config import config_from_dict
from tokenmill.server.app import create_app as create_server
from tokenmill.server.state import ServerSettings

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced_stack(embedder: Any, spans: InMemorySpanExporter) -> Iterator[RunningGateway]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings = ServerSettings(engine=EngineConfig(model=ModelConfig(dtype="float32"),
                                                  cache=CacheConfig(kv_cache_memory=2**25)))
    server = ServerThread(create_server(settings, tracer_provider=provider)).start()
    deadline = time.monotonic() + 300
    while httpx.get(server.url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "the in-process server did not load its model"
        time.sleep(0.1)
    app = create_gateway(config_from_dict(base_config([server.url])), embedder=embedder,
                         tracer_provider=provider)
    gateway = RunningGateway(app, ServerThread(app).start())
    yield gateway
    gateway.server.stop()
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_gateway_and_server_spans_share_one_trace(traced_stack: RunningGateway,
                                                  spans: InMemorySpanExporter,
                                                  stream: bool) -> None:
    client = traced_stack.client(KEY_BETA)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
        stream=stream)
    if stream:
        for _ in raw.parse():
            pass
    else:
        raw.parse()
    deadline = time.monotonic() + 30
    while len([s for s in spans.get_finished_spans()
               if s.name == "POST /v1/chat/completions"]) < 2:  # the gateway's and the server's
        assert time.monotonic() < deadline, [s.name for s in spans.get_finished_spans()]
        time.sleep(0.05)
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished}
    [gateway_span] = [s for s in finished if s.name == "POST /v1/chat/completions"
                      and s.parent is None]
    [server_span] = [s for s in finished if s.name == "POST /v1/chat/completions"
                     and s.parent is not None]
    assert server_span.parent.span_id == by_name["gateway.upstream"].context.span_id
    trace_id = gateway_span.context.trace_id
    for name in ("gateway.auth", "gateway.ratelimit", "gateway.upstream", "engine.request",
                 "queue", "prefill", "decode"):
        assert by_name[name].context.trace_id == trace_id, name
    assert server_span.context.trace_id == trace_id
    assert by_name["gateway.auth"].parent.span_id == gateway_span.context.span_id
    engine_span = by_name["engine.request"]
    assert engine_span.parent.span_id == server_span.context.span_id
    assert server_span.attributes["tokenmill.request_id"].startswith("chatcmpl-")
    assert engine_span.events[0].name == "queued"
    assert engine_span.events[-1].attributes["num_output_tokens"] == 4
    phases = [s for s in finished if s.parent is not None
              and s.parent.span_id == engine_span.context.span_id]
    assert [p.name for p in sorted(phases, key=lambda s: s.start_time)] == [
        "queue", "prefill", "decode"]
