"""RAG: the top-k chunks of a collection are injected as cited context before the question.

A request names a collection with an extra body field ``"rag": {"collection": NAME, "top_k": K}``
(or gets its tenant's default). The field is removed before the request goes upstream. Sources
used are returned in the ``x-tokenmill-rag-sources`` header and, for JSON answers, in
``tokenmill_rag_sources``.

Two stages, because the caches sit between them: ``RagSpecStage`` (before the caches) reads the
spec and brings the collection up to date, so the caches can key answers on the collection's
version (an answer built from documents since re-ingested is never served); ``RagStage`` (after
them, so a hit costs no retrieval) searches and injects. Loading a collection reads files and
runs off the event loop. Retrieved chunks pass through ``screen`` (the guardrails'
``screen_chunks``) before injection: a document can carry instructions aimed at the model, and it
may drop such chunks or refuse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.gateway.config import RagSection
from tokenmill.gateway.embedding_memo import embed_query
from tokenmill.gateway.embeddings import Embedder
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler
from tokenmill.gateway.protocol import CHAT, COMPLETIONS, query_text
from tokenmill.gateway.rag_store import RagPlan, RagStore, Retrieved

SOURCES_HEADER = "x-tokenmill-rag-sources"
SOURCES_FIELD = "tokenmill_rag_sources"
ChunkScreen = Callable[[GatewayRequest, list[Retrieved]], Awaitable[list[Retrieved]]]
_INSTRUCTION = ("Answer using the context below when it is relevant. Cite the sources you use "
                "by their [number].")


def format_context(found: list[Retrieved]) -> str:
    blocks = [f"[{i}] (source: {r.chunk.source})\n{r.chunk.text}" for i, r in enumerate(found, 1)]
    return _INSTRUCTION + "\n\n" + "\n\n".join(blocks)


def rag_cache_key(request: GatewayRequest) -> str | None:
    """The part of a cache key that RAG contributes (None: no RAG for this request)."""
    return request.rag.cache_key if request.rag is not None else None


class RagSpecStage:
    name = "rag_spec"

    def __init__(self, section: RagSection, store: RagStore) -> None:
        self.section = section
        self.store = store

    def _spec(self, request: GatewayRequest) -> tuple[str | None, int]:
        spec: Any = request.body.pop("rag", None)
        default = request.tenant.rag_collection if request.tenant else None
        if spec is None:
            return default, self.section.top_k
        if not isinstance(spec, dict):
            raise InvalidRequestError("'rag' must be an object like {\"collection\": \"docs\", "
                                      "\"top_k\": 3}", param="rag")
        unknown = set(spec) - {"collection", "top_k"}
        if unknown:
            raise InvalidRequestError(f"unknown field rag.{min(unknown)}; known: "
                                      "collection, top_k", param=f"rag.{min(unknown)}")
        top_k = spec.get("top_k", self.section.top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or \
                not 1 <= top_k <= self.section.max_top_k:
            raise InvalidRequestError(f"rag.top_k must be an integer in 1..{self.section.max_top_k}"
                                      f", got {top_k!r}", param="rag.top_k")
        collection = spec.get("collection", default)
        if collection is not None and not isinstance(collection, str):
            raise InvalidRequestError("rag.collection must be a string", param="rag.collection")
        return collection, top_k

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        if request.endpoint not in (CHAT, COMPLETIONS):
            return await call_next(request)
        name, top_k = self._spec(request)
        if name is not None:
            collection = self.store.collection(name)
            view = await asyncio.to_thread(collection.reload_if_changed)  # reads files
            request.rag = RagPlan(name, top_k, view)
        return await call_next(request)


class RagStage:
    name = "rag"

    def __init__(self, embedder: Embedder, screen: ChunkScreen | None = None) -> None:
        self.embedder = embedder
        self.screen = screen

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        plan = request.rag
        if plan is None:
            return await call_next(request)
        question = query_text(request.endpoint, request.body)
        vector = await embed_query(self.embedder, question)
        found = await asyncio.to_thread(plan.view.search, vector, plan.top_k)
        if self.screen is not None:
            found = await self.screen(request, found)
        if found:
            self._inject(request, format_context(found))
        request.extra_headers[SOURCES_HEADER] = ", ".join(
            f"{r.chunk.source}#{r.chunk.position}" for r in found)
        request.extra_fields[SOURCES_FIELD] = [
            {"index": i, "source": r.chunk.source, "chunk": r.chunk.position,
             "score": round(r.score, 4)} for i, r in enumerate(found, 1)]
        return await call_next(request)

    @staticmethod
    def _inject(request: GatewayRequest, context: str) -> None:
        if request.endpoint == COMPLETIONS:
            request.body["prompt"] = f"{context}\n\n{request.body['prompt']}"
            return
        messages = request.body["messages"]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"),
                        default=len(messages))
        request.body["messages"] = (messages[:last_user] + [{"role": "system", "content": context}]
                                    + messages[last_user:])
