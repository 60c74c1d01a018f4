"""Exact-match cache stage: the same tenant sending the same request gets the stored answer.

The key is a hash of the tenant and the whole request body except fields that do not change the
answer (``stream``, ``stream_options``, ``user``), so a streamed and a non-streamed request share
an entry, plus the RAG collection, top_k and the collection's version (a re-ingest makes new
keys). Entries expire after a TTL and the least recently used go first when full.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict

from tokenmill.gateway.config import CacheSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.rag import rag_cache_key
from tokenmill.gateway.response_cache import CachedAnswer, can_cache, replay, store_when_done

_IGNORED_FIELDS = ("stream", "stream_options", "user")


class LruTtlStore:
    """An LRU map whose entries also expire; small enough not to need a library."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()

    def get(self, key: str) -> CachedAnswer | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: str, answer: CachedAnswer) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, answer)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def exact_key(request: GatewayRequest) -> str:
    body = {k: v for k, v in request.body.items() if k not in _IGNORED_FIELDS}
    canonical = json.dumps([request.tenant_name, request.endpoint, body,
                            rag_cache_key(request)], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ExactCacheStage:
    name = "exact_cache"

    def __init__(self, section: CacheSection, metrics: GatewayMetrics) -> None:
        self.section = section
        self.store = LruTtlStore(section.max_entries, section.ttl_s)
        self.metrics = metrics

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        if not can_cache(request, self.section):
            return await call_next(request)
        key = exact_key(request)
        answer = self.store.get(key)
        if answer is not None:
            self.metrics.cache_lookups.labels("exact", "hit").inc()
            return replay(request, answer, "exact")
        self.metrics.cache_lookups.labels("exact", "miss").inc()
        response = await call_next(request)
        return store_when_done(request, response, lambda a: self.store.put(key, a))
