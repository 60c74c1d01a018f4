"""The deployment's HTTP front: reads each request, picks its prefix key, calls an engine replica
through a ``DeploymentHandle`` (so the request router sees the key), and streams the answer back.

Why a separate ingress: Ray's HTTP proxy hands a deployment's router only the ASGI scope (the body
is read later by the replica), so prefix-aware routing needs someone who has read the body. The
ingress is light (no model, no torch work, 0 CPUs reserved); everything else -- every endpoint,
error and metric -- is the engine replica's own tokenmill FastAPI app.

A replica that dies before the first byte of its answer reached the client (killed, OOM, its
engine failed) costs nothing: the ingress sends the request again, to another replica, up to
``MAX_ATTEMPTS`` times. After the first byte, the client sees the stream end early (as with any
server), since text already delivered cannot be taken back.

The ingress also sends the straggler-recovery probes (``ray_serve_probes``), from a task started
with its first request (its router exists only from then on).

Own endpoints: ``GET /ray/fleet`` (each replica's utilization, load, degraded mark, as the router
sees them) and ``GET /ray/metrics`` (the same in Prometheus format); the rest is forwarded.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tokenmill.distributed.ray_serve_fleet import FleetView, fleet_snapshot, render_fleet_metrics
from tokenmill.distributed.ray_serve_probes import run_probes
from tokenmill.distributed.ray_serve_replica import REPLICA_HEADER, ForwardedRequest
from tokenmill.errors import UpstreamUnavailableError
from tokenmill.openai_protocol import error_response

logger = logging.getLogger("tokenmill.ray_serve")

MAX_ATTEMPTS = 3
PREFIX_KEY_CHARS = 256
"""Characters of the prompt that make its routing key (as the gateway's ``prefix_chars``)."""
HOP_BY_HOP = {"content-length", "transfer-encoding", "connection"}


def prefix_key(body: bytes) -> str:
    """The first characters of the prompt (completions) or of the messages' text (chat)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(payload, dict):
        return ""
    prompt = payload.get("prompt")
    if prompt is None and isinstance(payload.get("messages"), list):
        parts = []
        for message in payload["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # content parts: their text
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', '')}:{content or ''}\n")
        prompt = "".join(parts)
    if prompt is None and isinstance(payload.get("input"), str):  # /v1/responses
        prompt = payload["input"]
    if isinstance(prompt, list):
        prompt = json.dumps(prompt[:1])  # a batch or token ids: key on the first
    return prompt[:PREFIX_KEY_CHARS] if isinstance(prompt, str) else ""


def _is_replica_gone(exc: BaseException) -> bool:
    """A replica died or became unreachable (retry elsewhere), as opposed to an answer."""
    from ray import exceptions as ray_exceptions

    return isinstance(exc, (ray_exceptions.RayActorError, ray_exceptions.ActorUnavailableError))


async def fleet_endpoint() -> JSONResponse:
    return JSONResponse(fleet_snapshot(FleetView.of_this_process()))


async def fleet_metrics_endpoint() -> Response:
    return Response(render_fleet_metrics(FleetView.of_this_process()), media_type=CONTENT_TYPE_LATEST)


def build_ingress_app() -> FastAPI:
    app = FastAPI(title="tokenmill (Ray Serve ingress)", docs_url=None, redoc_url=None)
    app.add_api_route("/ray/fleet", fleet_endpoint, methods=["GET"])
    app.add_api_route("/ray/metrics", fleet_metrics_endpoint, methods=["GET"])
    return app


class TokenmillIngress:
    """The ingress deployment class (wrapped with ``serve.ingress`` in ``ray_serve``)."""

    def __init__(self, replicas: Any, probe_interval_s: float = 2.0,
                 probe_timeout_s: float = 30.0) -> None:
        self.replicas = replicas.options(stream=True)
        self._probe_handle = replicas.options(method_name="probe")
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._probes: asyncio.Task | None = None

    def _start_probes(self) -> None:
        if self._probes is None or self._probes.done():
            self._probes = asyncio.get_running_loop().create_task(run_probes(
                self._probe_handle, self.probe_interval_s, self.probe_timeout_s))

    async def forward(self, request: Request) -> Response:
        self._start_probes()
        body = await request.body()
        forwarded = ForwardedRequest(
            method=request.method, path=request.url.path,
            query_string=request.url.query.encode(), headers=list(request.headers.raw),
            body=body, routing_key=prefix_key(body))
        last_error: BaseException | None = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stream = self.replicas.handle.remote(forwarded)
            try:
                head = await stream.__anext__()
            except BaseException as exc:
                if not _is_replica_gone(exc):
                    raise
                last_error = exc
                logger.warning("a replica was lost before answering (%s); attempt %d of %d",
                               type(exc).__name__, attempt, MAX_ATTEMPTS)
                continue
            headers = {k: v for k, v in head["headers"] if k.lower() not in HOP_BY_HOP}
            # the replica's actor name ends with the replica id the router counted it under
            replica_id = headers.get(REPLICA_HEADER, "").rpartition("#")[2]
            return StreamingResponse(_rest(stream, replica_id), status_code=head["status"],
                                     headers=headers)
        return error_response(UpstreamUnavailableError(
            f"no replica could answer after {MAX_ATTEMPTS} attempts: {last_error!r}"))


async def _rest(stream: Any, replica_id: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        stream.cancel()  # a client that left stops the replica's work too
        FleetView.of_this_process().on_finished(replica_id)
