"""Where the gateway's shared state lives: this process's memory, or one Redis every gateway
process of a fleet talks to.

Rate-limit windows and token quotas go through the ``limits`` library's asyncio storage (its
``MemoryStorage``, or its ``RedisStorage`` on redis-py's asyncio client), so the event loop never
waits on a socket; the exact cache uses the same Redis connection pool directly.

Redis is a dependency that can go away. Every Redis call here is bounded (``timeout_s``: socket
connect and read timeouts, no client-side retries, and ``asyncio.wait_for`` around the whole call
as a last bound), and a failed call marks Redis down for ``retry_interval_s``: until then callers
get ``SharedStateDown`` at once instead of each request waiting out the timeout. What a caller
does with ``SharedStateDown`` is its own policy (the rate limiter follows ``on_failure``; the
exact cache treats it as a miss). A transition down or up is logged once, not per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.errors import StorageError

from tokenmill.gateway.config import SharedStateSection
from tokenmill.gateway.metrics import GatewayMetrics

logger = logging.getLogger("tokenmill.gateway")
T = TypeVar("T")


class SharedStateDown(Exception):
    """Redis did not answer (or was marked down recently); the caller picks the fallback."""


class SharedState:
    """The storage behind rate limits, quotas and the exact cache, and its failure bookkeeping."""

    def __init__(self, section: SharedStateSection, metrics: GatewayMetrics) -> None:
        self.section = section
        self.metrics = metrics
        self.redis: Any = None
        """redis.asyncio.Redis on the shared pool, or None for in-memory state."""
        self._pool: Any = None
        self._down_until = 0.0
        self._is_down = False
        self.limits_storage: Storage
        if section.redis_url is None:
            self.limits_storage = MemoryStorage()
            return
        # Imported only when Redis is configured: the in-memory path never touches it.
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No client-side retries: redis-py's default retries with backoff would hold a request
        # for seconds while Redis is away; one bounded attempt, then the on_failure policy.
        self._pool = aioredis.ConnectionPool.from_url(
            section.redis_url, socket_timeout=section.timeout_s,
            socket_connect_timeout=section.timeout_s, retry=Retry(NoBackoff(), 0))
        self.redis = aioredis.Redis(connection_pool=self._pool)
        self.limits_storage = RedisStorage(
            _limits_uri(section.redis_url), implementation="redispy", wrap_exceptions=True,
            key_prefix=section.key_prefix, connection_pool=self._pool)
        metrics.shared_state_up.set(1)

    @property
    def is_shared(self) -> bool:
        return self.redis is not None

    def key(self, *parts: str) -> str:
        """A Redis key under the configured prefix: ``tokenmill:exact:<hash>``."""
        return ":".join((self.section.key_prefix, *parts))

    async def call(self, component: str, make: Callable[[], Awaitable[T]]) -> T:
        """Run one storage call within ``timeout_s``; raise ``SharedStateDown`` if Redis fails.

        Errors that are not Redis's (a 429 raised inside ``make``) pass through unchanged.
        """
        if not self.is_shared:
            return await make()
        if time.monotonic() < self._down_until:
            raise SharedStateDown(f"Redis at {self.section.redis_url} failed less than "
                                  f"{self.section.retry_interval_s:g} s ago")
        try:
            result = await asyncio.wait_for(make(), self.section.timeout_s)
        except (StorageError, OSError, TimeoutError, _redis_error()) as exc:
            self._mark_down(component, exc)
            raise SharedStateDown(f"Redis at {self.section.redis_url} did not answer: "
                                  f"{type(exc).__name__}: {exc}") from None
        if self._is_down:
            self._is_down = False
            self.metrics.shared_state_up.set(1)
            logger.warning("Redis at %s answers again; limits and the exact cache are shared "
                           "again", self.section.redis_url)
        return result

    def note_fallback(self, component: str, action: str) -> None:
        """Count a request that took the on_failure path (``allowed``, ``refused``, ``skipped``)."""
        self.metrics.shared_state_fallbacks.labels(component, action).inc()

    def _mark_down(self, component: str, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.section.retry_interval_s
        self.metrics.shared_state_errors.labels(component).inc()
        if not self._is_down:
            self._is_down = True
            self.metrics.shared_state_up.set(0)
            logger.error("Redis at %s failed in %s (%s: %s); shared_state.on_failure=%s: %s "
                         "until it answers (retried every %g s)", self.section.redis_url,
                         component, type(exc).__name__, exc, self.section.on_failure,
                         "requests pass without limits or cache" if self.section.on_failure ==
                         "open" else "requests of tenants with limits get 503",
                         self.section.retry_interval_s)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()


def _redis_error() -> type[Exception]:
    """redis-py's base error when it is importable (it is whenever Redis is configured)."""
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - redis is a dependency; memory mode never calls this
        return StorageError
    return RedisError


def _limits_uri(url: str) -> str:
    """``limits`` names its asyncio Redis schemes ``async+redis://`` and ``async+redis+unix://``."""
    if url.startswith("unix://"):
        return "async+redis+unix://" + url.removeprefix("unix://")
    return "async+" + url
