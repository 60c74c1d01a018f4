"""The verifier on its own: each rule of query_alignment, on queries outside the labelled set."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tokenmill.gateway.config import CacheSection
from tokenmill.gateway.embedding_memo import MemoizedEmbedder, embed_query
from tokenmill.gateway.semantic_cache import build_verifier


@pytest.fixture(scope="module")
def verifier(embedder):
    return build_verifier(CacheSection(), embedder)


def _similarity(embedder, first: str, second: str) -> float:
    vectors = embedder.embed([first, second])
    return float(vectors[0] @ vectors[1])


@pytest.mark.parametrize(("cached", "asked"), [
    ("How do I reset my password?", "Could you tell me how to reset my password?"),
    ("What's the boiling point of milk?", "What is the boiling point of milk?"),
    ("How do owls hunt?", "How does an owl hunt?"),
    ("In Rust, how do I read a file?", "How do I read a file in Rust?"),
    ("What year did the Titanic sink?", "What year the Titanic sank?"),
    ("How do I recieve a parcel abroad?", "How do I receive a parcel abroad?"),
    ("What is the GDP of the UAE?", "What is the GDP of the United Arab Emirates?"),
    ("Where is the United Arab Emirates?", "Where is the UAE?"),
])
def test_explained_differences_pass(embedder, verifier, cached, asked):
    verdict = verifier.verify(cached, asked, _similarity(embedder, cached, asked))
    assert verdict.same_question, verdict.reason


@pytest.mark.parametrize(("cached", "asked", "reason"), [
    ("Does Sam owe Kim money?", "Does Kim owe Sam money?", "changed places"),
    ("Convert pounds to kilograms.", "Convert kilograms to pounds.", "changed places"),
    ("Is it safe to jog after dinner?", "Is it safe to jog before dinner?", "became"),
    ("Which snakes are venomous?", "Which snakes are not venomous?", "'not'"),
    ("Who is the mayor of Boston?", "Who was the mayor of Boston?", "tense"),
    ("How do I upload photos to iCloud?", "How do I download photos from iCloud?", ""),
    ("How do I pin a tab in Firefox?", "How do I unpin a tab in Firefox?", "unexplained"),
    ("What is a good gift for my nephew?", "What is a good gift for my niece?", "unexplained"),
    ("Book a room for 3 nights.", "Book a room for 4 nights.", "no counterpart"),
    ("What should I eat before running?", "What must I eat before running?", "no counterpart"),
    ("Hi!", "Thanks!", "only filler"),
])
def test_unexplained_differences_deny(embedder, verifier, cached, asked, reason):
    verdict = verifier.verify(cached, asked, _similarity(embedder, cached, asked))
    assert not verdict.same_question
    assert reason in verdict.reason


def test_query_is_embedded_once_per_request(embedder):
    calls = []

    class Counting:
        dim = embedder.dim

        def embed(self, texts: list[str]) -> np.ndarray:
            calls.append(texts)
            return embedder.embed(texts)

    shared = MemoizedEmbedder(Counting())  # as build_gateway wraps the gateway's embedder

    async def twice() -> None:
        first = await embed_query(shared, "hi there")  # e.g. the semantic cache
        second = await embed_query(shared, "hi there")  # then RAG
        assert np.array_equal(first, second)

    asyncio.run(twice())
    assert calls == [["hi there"]]
