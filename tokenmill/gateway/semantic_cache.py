"""Semantic cache stage: a question close enough in meaning to an earlier one gets its answer.

The query text (last user message, or the prompt) is embedded and looked up in a FAISS inner-product
index over unit vectors (= cosine similarity). Entries are scoped by tenant, model, sampling
parameters, the rest of the conversation and the RAG spec: only the query itself may differ, and a
tenant never sees another tenant's answers. A candidate above the threshold must also pass the
``query_guard`` checks (negations, numbers, entities, opposites) before it counts as a hit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from tokenmill.gateway.config import CacheSection
from tokenmill.gateway.embeddings import Embedder
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.protocol import context_key, query_text, sampling_key
from tokenmill.gateway.query_guard import QueryFeatures, extract_features, same_meaning_markers
from tokenmill.gateway.response_cache import CachedAnswer, can_cache, replay, store_when_done

_NUM_CANDIDATES = 4


@dataclass
class _Entry:
    scope: str
    text: str
    features: QueryFeatures
    answer: CachedAnswer
    expires: float


@dataclass(frozen=True)
class SemanticMatch:
    entry_id: int
    similarity: float
    text: str


class SemanticIndex:
    """Scoped vectors + entries with TTL and an LRU bound; usable without HTTP (benchmarks)."""

    def __init__(self, dim: int, threshold: float, max_entries: int, ttl_s: float) -> None:
        self.dim = dim
        self.threshold = threshold
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._indexes: dict[str, object] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0

    def lookup(self, scope: str, text: str, vector: np.ndarray) -> tuple[SemanticMatch | None,
                                                                         CachedAnswer | None]:
        index = self._indexes.get(scope)
        if index is None or index.ntotal == 0:  # type: ignore[attr-defined]
            return None, None
        k = min(_NUM_CANDIDATES, index.ntotal)  # type: ignore[attr-defined]
        scores, ids = index.search(vector.reshape(1, -1), k)  # type: ignore[attr-defined]
        features = extract_features(text)
        now = time.monotonic()
        for score, entry_id in zip(scores[0], ids[0]):
            entry = self._entries.get(int(entry_id))
            if entry is None or score < self.threshold:
                continue
            if entry.expires < now:
                self._remove(int(entry_id))
                continue
            if not same_meaning_markers(features, entry.features):
                continue
            self._entries.move_to_end(int(entry_id))
            return SemanticMatch(int(entry_id), float(score), entry.text), entry.answer
        return None, None

    def add(self, scope: str, text: str, vector: np.ndarray, answer: CachedAnswer) -> None:
        import faiss  # heavy and optional: only loaded when a semantic cache exists

        index = self._indexes.get(scope)
        if index is None:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            self._indexes[scope] = index
        entry_id = self._next_id
        self._next_id += 1
        index.add_with_ids(vector.reshape(1, -1), np.array([entry_id], dtype=np.int64))
        self._entries[entry_id] = _Entry(scope, text, extract_features(text), answer,
                                         time.monotonic() + self.ttl_s)
        while len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        index = self._indexes[entry.scope]
        index.remove_ids(np.array([entry_id], dtype=np.int64))  # type: ignore[attr-defined]
        if index.ntotal == 0:  # type: ignore[attr-defined]
            del self._indexes[entry.scope]

    def __len__(self) -> int:
        return len(self._entries)


def semantic_scope(request: GatewayRequest) -> str:
    parts = [request.tenant_name, request.endpoint, request.body.get("model"),
             sampling_key(request.body), context_key(request.endpoint, request.body),
             json.dumps(request.body.get("rag"), sort_keys=True)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


class SemanticCacheStage:
    name = "semantic_cache"

    def __init__(self, section: CacheSection, embedder: Embedder, metrics: GatewayMetrics) -> None:
        self.section = section
        self.embedder = embedder
        self.index = SemanticIndex(embedder.dim, section.similarity_threshold,
                                   section.max_entries, section.ttl_s)
        self.metrics = metrics

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        text = query_text(request.endpoint, request.body) if can_cache(request, self.section) \
            else ""
        if not text.strip():
            return await call_next(request)
        scope = semantic_scope(request)
        # The model runs off the event loop so other requests keep flowing meanwhile.
        vector = (await asyncio.to_thread(self.embedder.embed, [text]))[0]
        match, answer = self.index.lookup(scope, text, vector)
        if answer is not None and match is not None:
            self.metrics.cache_lookups.labels("semantic", "hit").inc()
            request.extra_headers["x-tokenmill-cache-similarity"] = f"{match.similarity:.3f}"
            return replay(request, answer, "semantic")
        self.metrics.cache_lookups.labels("semantic", "miss").inc()
        response = await call_next(request)
        return store_when_done(request, response,
                               lambda a: self.index.add(scope, text, vector, a))
