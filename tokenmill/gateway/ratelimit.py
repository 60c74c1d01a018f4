"""Rate-limit stage: per-tenant token buckets (requests/min, tokens/min) and a concurrency cap.

Tokens are charged up front from an estimate of the prompt, then corrected from the answer's
``usage`` (prompt + completion) once it is known, so a tenant's long answers count against it.
A bucket may go into debt from that correction; the next request then waits until it refills.
Bucket levels are saved to an optional JSON state file (wall-clock times, so a restarted gateway
refills for the time it was down but does not forget a tenant's recent burst); the gateway writes
it in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.errors import RequestRejectedError
from tokenmill.gateway.config import TenantSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.protocol import StreamAssembler, estimate_tokens, prompt_text


@dataclass
class TokenBucket:
    capacity: float
    level: float
    updated: float

    @property
    def rate_per_s(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        return max(0.0, (amount - self.level) / self.rate_per_s)


class RateLimiter:
    """Bucket bookkeeping, separate from the HTTP stage so it can be saved and inspected."""

    def __init__(self, tenants: list[TenantSection], state_file: str | None = None) -> None:
        self.tenants = {t.name: t for t in tenants}
        self.state_file = Path(state_file) if state_file else None
        self.buckets: dict[tuple[str, str], TokenBucket] = {}
        self.in_flight: dict[str, int] = {t.name: 0 for t in tenants}
        now = time.time()
        for t in tenants:
            for kind, capacity in (("requests", t.requests_per_minute),
                                   ("tokens", t.tokens_per_minute)):
                if capacity > 0:
                    self.buckets[(t.name, kind)] = TokenBucket(capacity, capacity, now)
        self._load()

    def admit(self, tenant: TenantSection, num_tokens: int) -> None:
        """Take one request and ``num_tokens`` from the tenant's buckets, or raise 429."""
        now = time.time()
        if tenant.max_concurrent and self.in_flight[tenant.name] >= tenant.max_concurrent:
            raise _rejected(tenant, "concurrency", f"{tenant.max_concurrent} requests already "
                            "in flight", 1.0)
        requests = self.buckets.get((tenant.name, "requests"))
        tokens = self.buckets.get((tenant.name, "tokens"))
        for bucket in (requests, tokens):
            if bucket:
                bucket.refill(now)
        if requests and requests.level < 1:
            raise _rejected(tenant, "requests_per_minute", f"over {tenant.requests_per_minute} "
                            "requests per minute", requests.seconds_until(1))
        if tokens:
            # A prompt larger than a whole minute's budget can still pass once the bucket is full.
            need = min(float(num_tokens), tokens.capacity)
            if tokens.level < need:
                raise _rejected(tenant, "tokens_per_minute", f"over {tenant.tokens_per_minute} "
                                "tokens per minute", tokens.seconds_until(need))
            tokens.level -= num_tokens
        if requests:
            requests.level -= 1
        self.in_flight[tenant.name] += 1

    def release(self, tenant: TenantSection, estimated: int, actual: int | None) -> None:
        self.in_flight[tenant.name] -= 1
        tokens = self.buckets.get((tenant.name, "tokens"))
        if tokens and actual is not None:
            tokens.level -= actual - estimated

    def snapshot(self) -> dict[str, Any]:
        """The bucket levels as plain data (cheap; taken on the event loop, written off it)."""
        return {f"{name}/{kind}": {"level": b.level, "updated": b.updated}
                for (name, kind), b in self.buckets.items()}

    def save(self) -> None:
        self.write(self.snapshot())

    async def save_off_loop(self) -> None:
        """Save without stalling the event loop: the snapshot here, the file write in a thread."""
        if self.state_file is not None:
            await asyncio.to_thread(self.write, self.snapshot())

    def write(self, state: dict[str, Any]) -> None:
        """Write a snapshot to the state file (blocking file I/O)."""
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(self.state_file.suffix + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # atomic: a crash mid-write never leaves half a file

    def _load(self) -> None:
        if self.state_file is None or not self.state_file.is_file():
            return
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError):
            return  # a corrupt state file only costs the remembered levels, never the start-up
        for (name, kind), bucket in self.buckets.items():
            saved = state.get(f"{name}/{kind}")
            if isinstance(saved, dict):
                bucket.level = min(bucket.capacity, float(saved.get("level", bucket.level)))
                bucket.updated = float(saved.get("updated", bucket.updated))


def _rejected(tenant: TenantSection, limit: str, why: str, wait_s: float) -> RequestRejectedError:
    exc = RequestRejectedError(f"rate limit for tenant {tenant.name!r}: {why}; retry after "
                               f"{math.ceil(wait_s)} s", retry_after_seconds=max(1.0, wait_s),
                               code=limit)
    exc.limit = limit  # type: ignore[attr-defined]
    return exc


class RateLimitStage:
    name = "ratelimit"

    def __init__(self, limiter: RateLimiter, metrics: GatewayMetrics) -> None:
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        tenant = request.tenant
        assert tenant is not None, "auth runs before rate limiting"
        estimated = 0
        if request.endpoint in ("chat.completions", "completions"):
            estimated = estimate_tokens(prompt_text(request.endpoint, request.body))
        elif request.endpoint == "embeddings":
            estimated = estimate_tokens(json.dumps(request.body.get("input", "")))
        request.estimated_tokens = estimated
        try:
            self.limiter.admit(tenant, estimated)
        except RequestRejectedError as exc:
            self.metrics.ratelimit_rejections.labels(tenant.name, exc.limit).inc()  # type: ignore
            raise
        try:
            response = await call_next(request)
        except BaseException:
            self.limiter.release(tenant, estimated, None)
            raise
        if response.events is None:
            self.limiter.release(tenant, estimated, _total_tokens(response.body, estimated))
            return response
        response.events = self._count_stream(request, response.events)
        return response

    async def _count_stream(self, request: GatewayRequest,
                            events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        assembler = StreamAssembler(request.endpoint)
        try:
            async for event in events:
                assembler.add(event)
                yield event
        finally:
            if assembler.usage:
                actual = _total_tokens({"usage": assembler.usage}, request.estimated_tokens)
            else:  # upstream sent no usage: estimate the completion from its text
                actual = request.estimated_tokens + max(1, assembler.text_chars // 4)
            self.limiter.release(request.tenant, request.estimated_tokens, actual)  # type: ignore


def _total_tokens(body: dict[str, Any] | None, fallback: int) -> int:
    usage = (body or {}).get("usage") or {}
    total = usage.get("total_tokens")
    return int(total) if isinstance(total, int) else fallback
