"""Rate-limit stage: per-tenant requests/min and tokens/min (quota) limits and a concurrency cap.

The windows are the ``limits`` library's, kept in this process's memory or in the Redis of
``shared_state`` (shared_state.py), so several gateway processes enforce one tenant's limits
together:

- requests/min is a **moving window** (at most N requests in any 60 s; Retry-After is when the
  oldest of them leaves the window). It is checked and taken in one atomic step (a Lua script on
  Redis), so two processes never both take the last request.
- tokens/min is a **fixed window** counter (a counter that starts with the first request and
  expires after 60 s). Tokens are charged up front from an estimate of the prompt, then corrected
  from the answer's ``usage`` (prompt + completion) once it is known, so a tenant's long answers
  count against it; the counter may go over the limit from that correction, and the next request
  then waits until the window ends. The check and the charge are two steps, so processes racing
  on the last tokens can overshoot by one request's estimate.
- the concurrency cap counts this process's requests in flight (it is not shared).

When Redis does not answer, ``shared_state.on_failure`` decides: ``open`` lets the request pass
uncounted, ``closed`` answers 503; both are logged and counted. In memory, the windows can be
saved to an optional JSON state file, written in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from tokenmill.errors import RequestRejectedError, SharedStateUnavailableError
from tokenmill.gateway.config import TenantSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.protocol import (
    StreamAssembler,
    estimate_tokens,
    estimate_tokens_from_chars,
    prompt_text,
)
from tokenmill.gateway.shared_state import SharedState, SharedStateDown

_NAMESPACE = "ratelimit"
"""First part of every window's key: ``<prefix>:ratelimit/<tenant>/<kind>/<N>/1/minute``."""


class RateLimiter:
    """Window bookkeeping, separate from the HTTP stage so it can be saved and inspected."""

    def __init__(self, tenants: list[TenantSection], state: SharedState,
                 state_file: str | None = None) -> None:
        self.tenants = {t.name: t for t in tenants}
        self.state = state
        # Redis keeps its own state across restarts; the file is for in-memory windows only.
        self.state_file = Path(state_file) if state_file and not state.is_shared else None
        self.requests = MovingWindowRateLimiter(state.limits_storage)
        self.tokens = FixedWindowRateLimiter(state.limits_storage)
        self.items: dict[tuple[str, str], RateLimitItem] = {}
        self.in_flight: dict[str, int] = {t.name: 0 for t in tenants}
        self.num_tokens_charged: dict[str, int] = {t.name: 0 for t in tenants}
        """Tokens this process charged each tenant (estimates plus corrections), for tests."""
        for t in tenants:
            for kind, amount in (("requests", t.requests_per_minute),
                                 ("tokens", t.tokens_per_minute)):
                if amount > 0:
                    self.items[(t.name, kind)] = RateLimitItemPerMinute(amount,
                                                                        namespace=_NAMESPACE)

    def has_limits(self, tenant: TenantSection) -> bool:
        return (tenant.name, "requests") in self.items or (tenant.name, "tokens") in self.items

    async def admit(self, tenant: TenantSection, num_tokens: int) -> bool:
        """Take one request and ``num_tokens`` from the tenant's windows, or raise 429.

        Returns whether they were charged: False when Redis is down and ``on_failure`` is open
        (the request passes uncounted, so there is nothing to correct later).
        """
        if tenant.max_concurrent and self.in_flight[tenant.name] >= tenant.max_concurrent:
            raise _rejected(tenant, "concurrency", f"{tenant.max_concurrent} requests already "
                            "in flight", 1.0)
        # The slot is taken before the (maybe Redis) await, so requests arriving meanwhile see it.
        self.in_flight[tenant.name] += 1
        try:
            return await self._charge_or_fallback(tenant, num_tokens)
        except BaseException:
            self.in_flight[tenant.name] -= 1
            raise

    async def _charge_or_fallback(self, tenant: TenantSection, num_tokens: int) -> bool:
        if not self.has_limits(tenant):
            return True
        try:
            await self.state.call("ratelimit", lambda: self._charge(tenant, num_tokens))
        except SharedStateDown as exc:
            if self.state.section.on_failure == "closed":
                self.state.note_fallback("ratelimit", "refused")
                raise SharedStateUnavailableError(
                    f"rate limits of tenant {tenant.name!r} cannot be checked: {exc}; "
                    "shared_state.on_failure is 'closed', so requests are refused until "
                    "Redis answers", code="shared_state_unavailable") from None
            self.state.note_fallback("ratelimit", "allowed")
            return False
        return True

    async def _charge(self, tenant: TenantSection, num_tokens: int) -> None:
        name = tenant.name
        requests = self.items.get((name, "requests"))
        tokens = self.items.get((name, "tokens"))
        if tokens is not None:
            # A prompt larger than a whole minute's budget can still pass in an empty window.
            need = max(1, min(num_tokens, tokens.amount))
            if not await self.tokens.test(tokens, name, "tokens", cost=need):
                stats = await self.tokens.get_window_stats(tokens, name, "tokens")
                raise _rejected(tenant, "tokens_per_minute", f"over {tenant.tokens_per_minute} "
                                "tokens per minute", stats.reset_time - time.time())
        if requests is not None and not await self.requests.hit(requests, name, "requests"):
            stats = await self.requests.get_window_stats(requests, name, "requests")
            raise _rejected(tenant, "requests_per_minute", f"over {tenant.requests_per_minute} "
                            "requests per minute", stats.reset_time - time.time())
        if tokens is not None and num_tokens > 0:
            await self.tokens.hit(tokens, name, "tokens", cost=num_tokens)
            self.num_tokens_charged[name] += num_tokens

    async def release(self, tenant: TenantSection, estimated: int, actual: int | None,
                      charged: bool = True) -> None:
        """The request ended: correct its token charge and free its concurrency slot (last, so
        a caller that sees no request in flight sees the corrected charge)."""
        tokens = self.items.get((tenant.name, "tokens"))
        try:
            if charged and tokens is not None and actual is not None and actual != estimated:
                await self.state.call(
                    "ratelimit", lambda: self._correct(tenant.name, tokens, actual - estimated))
        except SharedStateDown:
            # The answer is already on its way; only the correction is lost.
            self.state.note_fallback("ratelimit", "skipped")
        finally:
            self.in_flight[tenant.name] -= 1

    async def _correct(self, name: str, item: RateLimitItem, delta: int) -> None:
        storage = self.state.limits_storage
        key = item.key_for(name, "tokens")
        if delta < 0:
            # A refund never takes the counter below 0 (nor into a fresh window as a credit).
            delta = -min(-delta, await storage.get(key))
            if delta == 0:
                return
        await storage.incr(key, item.get_expiry(), amount=delta)
        self.num_tokens_charged[name] += delta

    async def snapshot(self) -> dict[str, Any]:
        """What each window has used and when it resets (wall clock), as plain data."""
        state: dict[str, Any] = {}
        for (name, kind), item in self.items.items():
            if kind == "requests":
                stats = await self.requests.get_window_stats(item, name, kind)
                used = item.amount - stats.remaining
            else:
                stats = await self.tokens.get_window_stats(item, name, kind)
                used = await self.state.limits_storage.get(item.key_for(name, kind))
            if used > 0:
                state[f"{name}/{kind}"] = {"used": used, "reset": stats.reset_time}
        return state

    async def save_off_loop(self) -> None:
        """Save without stalling the event loop: the snapshot here, the file write in a thread."""
        if self.state_file is not None:
            await asyncio.to_thread(self.write, await self.snapshot())

    def write(self, state: dict[str, Any]) -> None:
        """Write a snapshot to the state file (blocking file I/O)."""
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(self.state_file.suffix + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # atomic: a crash mid-write never leaves half a file

    async def load(self) -> None:
        """Take back the windows a previous run saved (at start-up, before any request).

        A token window ends when it would have; a request window's entries are restored with
        the restart's time, so after a restart a tenant waits up to a minute longer, never less.
        """
        if self.state_file is None:
            return
        try:
            text = await asyncio.to_thread(self.state_file.read_text)
            state = json.loads(text)
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError):
            return  # a corrupt state file only costs the remembered windows, never the start-up
        now = time.time()
        storage = self.state.limits_storage
        for (name, kind), item in self.items.items():
            saved = state.get(f"{name}/{kind}") if isinstance(state, dict) else None
            if not isinstance(saved, dict):
                continue
            used, reset = int(saved.get("used", 0)), float(saved.get("reset", 0.0))
            if used <= 0 or reset <= now:
                continue
            if kind == "requests":
                await self.requests.hit(item, name, kind, cost=min(used, item.amount))
            else:
                await storage.incr(item.key_for(name, kind), max(1, math.ceil(reset - now)),
                                   amount=used)


def _rejected(tenant: TenantSection, limit: str, why: str, wait_s: float) -> RequestRejectedError:
    wait_s = max(1.0, wait_s)
    exc = RequestRejectedError(f"rate limit for tenant {tenant.name!r}: {why}; retry after "
                               f"{math.ceil(wait_s)} s", retry_after_seconds=wait_s, code=limit)
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
            charged = await self.limiter.admit(tenant, estimated)
        except RequestRejectedError as exc:
            self.metrics.ratelimit_rejections.labels(tenant.name, exc.limit).inc()  # type: ignore
            raise
        try:
            response = await call_next(request)
        except BaseException:
            await self.limiter.release(tenant, estimated, None, charged)
            raise
        if response.events is None:
            await self.limiter.release(tenant, estimated,
                                       _total_tokens(response.body, estimated), charged)
            return response
        response.events = self._count_stream(request, response.events, charged)
        return response

    async def _count_stream(self, request: GatewayRequest, events: AsyncIterator[dict[str, Any]],
                            charged: bool) -> AsyncIterator[dict[str, Any]]:
        assembler = StreamAssembler(request.endpoint)
        try:
            async for event in events:
                assembler.add(event)
                yield event
        finally:
            if assembler.usage:
                actual = _total_tokens({"usage": assembler.usage}, request.estimated_tokens)
            else:  # upstream sent no usage: estimate the completion from its text
                actual = request.estimated_tokens + estimate_tokens_from_chars(assembler.text_chars)
            await self.limiter.release(request.tenant, request.estimated_tokens,  # type: ignore
                                       actual, charged)


def _total_tokens(body: dict[str, Any] | None, fallback: int) -> int:
    usage = (body or {}).get("usage") or {}
    total = usage.get("total_tokens")
    return int(total) if isinstance(total, int) else fallback
