"""Semantic cache stage: a question that asks the same thing as an earlier one gets its answer.

The query text (last user message, or the prompt) is embedded once per request
(``embedding_memo``) and looked up in a FAISS inner-product index over unit vectors (= cosine
similarity). Entries are scoped by tenant, model, sampling parameters, the rest of the
conversation and the RAG collection with its version: only the query itself may differ, and a tenant never sees another
tenant's answers. The embedding only finds candidates; a candidate above the threshold (the
tenant's own, or the cache's) is served only when ``QueryAlignment`` explains every word in which
the two queries differ. A false miss costs an upstream call; a false hit serves a wrong answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from tokenmill.gateway.config import CacheSection
from tokenmill.gateway.embedding_memo import embed_query
from tokenmill.gateway.embeddings import Embedder
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.protocol import context_key, query_text, sampling_key
from tokenmill.gateway.query_alignment import QueryAlignment
from tokenmill.gateway.query_words import load_lexicon
from tokenmill.gateway.rag import rag_cache_key
from tokenmill.gateway.response_cache import CachedAnswer, can_cache, replay, store_when_done
from tokenmill.gateway.word_similarity import WordSimilarity

_NUM_CANDIDATES = 4


@dataclass
class _Entry:
    scope: str
    text: str
    answer: CachedAnswer
    expires: float


@dataclass(frozen=True)
class SemanticMatch:
    entry_id: int
    similarity: float
    text: str


class SemanticIndex:
    """Scoped vectors + entries with TTL and an LRU bound; usable without HTTP (benchmarks).

    ``verifier`` None serves any candidate above the threshold (the embedding alone decides).
    """

    def __init__(self, dim: int, threshold: float, max_entries: int, ttl_s: float,
                 verifier: QueryAlignment | None = None) -> None:
        self.dim = dim
        self.threshold = threshold
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.verifier = verifier
        self._indexes: dict[str, object] = {}
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_id = 0
        # Lookups run in worker threads (the verifier embeds words); adds on the event loop.
        self._lock = threading.Lock()

    def lookup(self, scope: str, text: str, vector: np.ndarray, threshold: float | None = None
               ) -> tuple[SemanticMatch | None, CachedAnswer | None]:
        for candidate in self._candidates(
                scope, vector, self.threshold if threshold is None else threshold):
            # Verified outside the lock: it may run the embedder on the differing words.
            if self.verifier is not None and not self.verifier.verify(
                    candidate.text, text, candidate.similarity).same_question:
                continue
            with self._lock:
                entry = self._entries.get(candidate.entry_id)
                if entry is None:  # evicted meanwhile
                    continue
                self._entries.move_to_end(candidate.entry_id)
                return candidate, entry.answer
        return None, None

    def _candidates(self, scope: str, vector: np.ndarray, threshold: float
                    ) -> list[SemanticMatch]:
        with self._lock:
            index = self._indexes.get(scope)
            if index is None or index.ntotal == 0:  # type: ignore[attr-defined]
                return []
            k = min(_NUM_CANDIDATES, index.ntotal)  # type: ignore[attr-defined]
            scores, ids = index.search(vector.reshape(1, -1), k)  # type: ignore[attr-defined]
            now = time.monotonic()
            found = []
            for score, entry_id in zip(scores[0], ids[0]):
                entry = self._entries.get(int(entry_id))
                if entry is None or score < threshold:
                    continue
                if entry.expires < now:
                    self._remove(int(entry_id))
                    continue
                found.append(SemanticMatch(int(entry_id), float(score), entry.text))
            return found

    def add(self, scope: str, text: str, vector: np.ndarray, answer: CachedAnswer) -> None:
        import faiss  # heavy and optional: only loaded when a semantic cache exists

        with self._lock:
            index = self._indexes.get(scope)
            if index is None:
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
                self._indexes[scope] = index
            entry_id = self._next_id
            self._next_id += 1
            index.add_with_ids(vector.reshape(1, -1), np.array([entry_id], dtype=np.int64))
            self._entries[entry_id] = _Entry(scope, text, answer, time.monotonic() + self.ttl_s)
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


def build_verifier(section: CacheSection, embedder: Embedder) -> QueryAlignment | None:
    if not section.verify_queries:
        return None
    load_lexicon()
    return QueryAlignment(WordSimilarity(embedder), section.verifier_word_threshold,
                          section.verifier_context_word_threshold,
                          section.verifier_context_query_threshold)


def semantic_scope(request: GatewayRequest) -> str:
    parts = [request.tenant_name, request.endpoint, request.body.get("model"),
             sampling_key(request.body), context_key(request.endpoint, request.body),
             rag_cache_key(request)]  # collection, top_k and its version
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


class SemanticCacheStage:
    name = "semantic_cache"

    def __init__(self, section: CacheSection, embedder: Embedder, metrics: GatewayMetrics) -> None:
        self.section = section
        self.embedder = embedder
        self.index = SemanticIndex(embedder.dim, section.similarity_threshold,
                                   section.max_entries, section.ttl_s,
                                   build_verifier(section, embedder))
        self.metrics = metrics

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        text = query_text(request.endpoint, request.body) if can_cache(request, self.section) \
            else ""
        if not text.strip():
            return await call_next(request)
        scope = semantic_scope(request)
        vector = await embed_query(self.embedder, text)
        threshold = request.tenant.semantic_cache_threshold if request.tenant else None
        match, answer = await asyncio.to_thread(self.index.lookup, scope, text, vector, threshold)
        if answer is not None and match is not None:
            self.metrics.cache_lookups.labels("semantic", "hit").inc()
            request.extra_headers["x-tokenmill-cache-similarity"] = f"{match.similarity:.3f}"
            return replay(request, answer, "semantic")
        self.metrics.cache_lookups.labels("semantic", "miss").inc()
        response = await call_next(request)
        return store_when_done(request, response,
                               lambda a: self.index.add(scope, text, vector, a))
