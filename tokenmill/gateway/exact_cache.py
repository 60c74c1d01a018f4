"""Exact-match cache stage: the same tenant sending the same request gets the stored answer.

The key is a hash of the tenant and the whole request body except fields that do not change the
answer (``stream``, ``stream_options``, ``user``), so a streamed and a non-streamed request share
an entry, plus the RAG collection, top_k and the collection's version (a re-ingest makes new
keys). Entries expire after a TTL and the least recently used go first when full.

With ``shared_state.redis_url`` the entries live in Redis (``<prefix>:exact:<sha256>``, JSON, the
TTL as Redis's expiry; Redis's own ``maxmemory-policy`` evicts instead of ``max_entries``), so an
answer one gateway process stored is a hit on every other. A Redis that does not answer makes
every lookup a miss and every store a no-op (counted, never an error): the cache only saves work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Protocol

from tokenmill.gateway.config import CacheSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.rag import rag_cache_key
from tokenmill.gateway.response_cache import CachedAnswer, can_cache, replay, store_when_done
from tokenmill.gateway.shared_state import SharedState, SharedStateDown

_IGNORED_FIELDS = ("stream", "stream_options", "user")


class AnswerStore(Protocol):
    async def get(self, key: str) -> CachedAnswer | None: ...

    async def put(self, key: str, answer: CachedAnswer) -> None: ...


class LruTtlStore:
    """An LRU map whose entries also expire; small enough not to need a library."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()

    async def get(self, key: str) -> CachedAnswer | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    async def put(self, key: str, answer: CachedAnswer) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, answer)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class RedisAnswerStore:
    """Answers in the shared Redis; a Redis failure is a miss or a skipped store."""

    def __init__(self, state: SharedState, ttl_s: float) -> None:
        self.state = state
        self.ttl_s = max(1, math.ceil(ttl_s))  # Redis expiries are whole seconds here

    async def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = await self.state.call("exact_cache",
                                        lambda: self.state.redis.get(self.state.key("exact", key)))
        except SharedStateDown:
            self.state.note_fallback("exact_cache", "skipped")
            return None
        if raw is None:
            return None
        try:
            return CachedAnswer(**json.loads(raw))
        except (ValueError, TypeError):
            return None  # an entry another version wrote in another shape: a miss

    async def put(self, key: str, answer: CachedAnswer) -> None:
        data = json.dumps(dataclasses.asdict(answer))
        try:
            await self.state.call("exact_cache", lambda: self.state.redis.set(
                self.state.key("exact", key), data, ex=self.ttl_s))
        except SharedStateDown:
            self.state.note_fallback("exact_cache", "skipped")


def exact_key(request: GatewayRequest) -> str:
    body = {k: v for k, v in request.body.items() if k not in _IGNORED_FIELDS}
    canonical = json.dumps([request.tenant_name, request.endpoint, body,
                            rag_cache_key(request)], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ExactCacheStage:
    name = "exact_cache"

    def __init__(self, section: CacheSection, metrics: GatewayMetrics,
                 state: SharedState | None = None) -> None:
        self.section = section
        self.store: AnswerStore = (RedisAnswerStore(state, section.ttl_s)
                                   if state is not None and state.is_shared
                                   else LruTtlStore(section.max_entries, section.ttl_s))
        self.metrics = metrics

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        if not can_cache(request, self.section):
            return await call_next(request)
        key = exact_key(request)
        answer = await self.store.get(key)
        if answer is not None:
            self.metrics.cache_lookups.labels("exact", "hit").inc()
            return replay(request, answer, "exact")
        self.metrics.cache_lookups.labels("exact", "miss").inc()
        response = await call_next(request)
        # store_when_done hands over a finished answer synchronously; the (maybe Redis) store is
        # awaited here, before the response (or the stream's end) reaches the client, so the
        # next identical request, on any gateway process, finds it.
        finished: list[CachedAnswer] = []
        response = store_when_done(request, response, finished.append)
        if response.events is None:
            if finished:
                await self.store.put(key, finished[0])
            return response
        response.events = self._store_after(response.events, key, finished)
        return response

    async def _store_after(self, events: AsyncIterator[dict[str, Any]], key: str,
                           finished: list[CachedAnswer]) -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in events:
                yield event
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        if finished:  # only set when the stream ran to its normal end
            await self.store.put(key, finished[0])
