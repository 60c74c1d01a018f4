"""The terminal stage: send the request to a replica over HTTP and pass its answer back.

Replicas are tried in the router's order; one that cannot be reached, times out, or answers 5xx
*before the first byte* of its answer is recorded as a failure and the next one is tried. Once an
answer has started, it is passed through chunk by chunk (SSE events, parsed one at a time by
``tokenmill.sse_parser`` so the later stages can look at them); a failure after that point ends
the stream with an error event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tokenmill.errors import UnknownModelError, UpstreamUnavailableError
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse
from tokenmill.gateway.protocol import CHAT, prompt_text
from tokenmill.gateway.router import Replica, Router
from tokenmill.openai_protocol import error_body
from tokenmill.sse_parser import aiter_sse
from tokenmill.telemetry import child_span, inject_traceparent

PATHS = {CHAT: "/v1/chat/completions", "completions": "/v1/completions"}


def _error_event(message: str) -> dict[str, Any]:
    return error_body(message, "upstream_error", code="upstream_stream_failed")


def _passed_headers(resp: httpx.Response) -> dict[str, str]:
    """The server's request id (the key of its trace, readable through the gateway too)."""
    request_id = resp.headers.get("x-request-id")
    return {"x-request-id": request_id} if request_id else {}


class UpstreamStage:
    name = "upstream"

    def __init__(self, router: Router, client: httpx.AsyncClient, metrics: GatewayMetrics) -> None:
        self.router = router
        self.client = client
        self.metrics = metrics

    async def __call__(self, request: GatewayRequest) -> GatewayResponse:
        with child_span("gateway.upstream"):  # the server's request span becomes its child
            return await self._send(request)

    async def _send(self, request: GatewayRequest) -> GatewayResponse:
        model = request.body["model"]
        if not self.router.knows_model(model):
            raise UnknownModelError(f"model {model!r} is not served by any upstream; see "
                                    "/v1/models", param="model", code="model_not_found")
        # A client's own "priority" would override its tenant's (the server prefers the body).
        body = {k: v for k, v in request.body.items() if k not in ("rag", "priority")}
        if request.stream:
            # Always ask for usage so the token bucket can be corrected; the app drops the usage
            # chunk again when the caller did not ask for it.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        headers = {"x-tokenmill-tenant": request.tenant_name,
                   "x-tokenmill-priority": str(request.tenant.priority if request.tenant else 0)}
        inject_traceparent(headers)  # the server's spans join the gateway's trace
        plan = self.router.plan(model, prompt_text(request.endpoint, request.body))
        last_error = "no upstream is healthy"
        for replica in plan:
            attempt = object()
            if not self.router.acquire(replica, attempt):  # half-open, its probe already out
                last_error = f"{replica.name}: circuit half-open, waiting for its probe"
                continue
            replica.outstanding += 1
            self.metrics.upstream_outstanding.labels(replica.name).set(replica.outstanding)
            started = time.perf_counter()
            try:
                http_request = self.client.build_request(
                    "POST", replica.url + PATHS[request.endpoint], json=body, headers=headers)
                resp = await self.client.send(http_request, stream=True)
            except httpx.TransportError as exc:
                self._done(replica, attempt)
                self.router.record_failure(replica, type(exc).__name__)
                last_error = f"{replica.name}: {type(exc).__name__}"
                continue
            except BaseException:  # the caller went away: a probe without a verdict
                self._done(replica, attempt)
                raise
            self.metrics.upstream_latency.labels(replica.name).observe(
                time.perf_counter() - started)
            if resp.status_code >= 500:
                await resp.aclose()
                self._done(replica, attempt)
                self.router.record_failure(replica, f"http_{resp.status_code}")
                last_error = f"{replica.name}: HTTP {resp.status_code}"
                continue
            if resp.status_code != 200 or not request.stream:
                try:
                    return await self._whole(replica, resp)
                except httpx.TransportError as exc:
                    self.router.record_failure(replica, type(exc).__name__)
                    last_error = f"{replica.name}: {type(exc).__name__} while reading"
                    continue
                finally:
                    self._done(replica, attempt)
            self.router.record_success(replica)
            return GatewayResponse(events=self._events(replica, resp, attempt),
                                   headers=_passed_headers(resp))
        raise UpstreamUnavailableError(f"no upstream could answer for model {model!r} "
                                       f"(tried {len(plan)}; last: {last_error})",
                                       code="upstream_unavailable")

    def _done(self, replica: Replica, attempt: object) -> None:
        self.router.release(replica, attempt)
        replica.outstanding -= 1
        self.metrics.upstream_outstanding.labels(replica.name).set(replica.outstanding)

    async def _whole(self, replica: Replica, resp: httpx.Response) -> GatewayResponse:
        try:
            raw = await resp.aread()
        finally:
            await resp.aclose()
        try:
            data = json.loads(raw)
        except ValueError:
            data = error_body(f"upstream {replica.name} sent a non-JSON answer",
                              "upstream_error")
            return GatewayResponse(body=data, status_code=502)
        if resp.status_code == 200:
            self.router.record_success(replica)
        return GatewayResponse(body=data, status_code=resp.status_code,
                               headers=_passed_headers(resp))

    async def _events(self, replica: Replica, resp: httpx.Response, attempt: object
                      ) -> AsyncIterator[dict[str, Any]]:
        try:
            async for sse in aiter_sse(resp):  # the one SSE parser (tokenmill/sse_parser.py)
                if sse.data.strip() == "[DONE]":
                    return
                try:
                    event = json.loads(sse.data)
                except ValueError:
                    event = None
                if not isinstance(event, dict):
                    yield _error_event(f"upstream {replica.name} sent a malformed stream event")
                    return
                yield event
        except httpx.HTTPError as exc:
            self.router.record_failure(replica, "stream_" + type(exc).__name__)
            yield _error_event(f"upstream {replica.name} failed mid-stream "
                               f"({type(exc).__name__})")
        finally:
            await resp.aclose()
            self._done(replica, attempt)
