"""The semantic cache never serves a different question's answer: near-misses from the held-out
test half of benchmarks/data/semantic_cache_pairs.jsonl stay misses through the real stage and
the real embedding model, paraphrases hit at the measured rate, and a tenant's own threshold
applies to that tenant only."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.gateway.helpers import KEY_ACME, KEY_BETA, REPO, base_config, chat
from tokenmill.gateway.config import CacheSection, TenantSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse
from tokenmill.gateway.protocol import CHAT
from tokenmill.gateway.semantic_cache import SemanticCacheStage

PAIRS = [json.loads(line) for line in
         (REPO / "benchmarks" / "data" / "semantic_cache_pairs.jsonl").read_text().splitlines()]
TEST_HALF = [p for p in PAIRS if p["split"] == "test"]


def _first_near_miss_of_each_kind() -> list[dict[str, Any]]:
    """The fixed sample sent over HTTP: the test half's first near-miss of every kind."""
    chosen: dict[str, dict[str, Any]] = {}
    for pair in TEST_HALF:
        if pair["label"] == "near_miss":
            chosen.setdefault(pair["kind"], pair)
    return list(chosen.values())


HTTP_SAMPLE = _first_near_miss_of_each_kind()


@pytest.mark.parametrize("pair", HTTP_SAMPLE, ids=[p["kind"] for p in HTTP_SAMPLE])
def test_near_miss_from_the_test_half_never_hits_over_http(upstreams, start_gateway, pair):
    (fake, server), _ = upstreams
    gw = start_gateway(base_config([server.url]))
    first = chat(gw.client(), pair["cached"])
    second = chat(gw.client(), pair["asked"])
    assert "x-tokenmill-cache" not in second.headers, pair
    assert second.parse().choices[0].message.content != \
        first.parse().choices[0].message.content
    assert fake.num_requests == 2


def _hits_through_the_stage(embedder, pairs: list[dict[str, Any]]) -> list[bool]:
    """Each pair through one real SemanticCacheStage: cache the first query's answer, ask the
    second. A tenant per pair keeps the pairs' scopes apart."""
    stage = SemanticCacheStage(CacheSection(), embedder, GatewayMetrics())

    def request(text: str, tenant: str) -> GatewayRequest:
        return GatewayRequest(CHAT, {"model": "tiny", "temperature": 0,
                                     "messages": [{"role": "user", "content": text}]},
                              api_key=None, tenant=TenantSection(name=tenant))

    async def upstream(req: GatewayRequest) -> GatewayResponse:
        return GatewayResponse(body={"choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant",
                                                              "content": "fresh"}}]})

    async def run() -> list[bool]:
        hits = []
        for i, pair in enumerate(pairs):
            await stage(request(pair["cached"], f"t{i}"), upstream)
            asked = request(pair["asked"], f"t{i}")
            await stage(asked, upstream)
            hits.append(asked.extra_headers.get("x-tokenmill-cache") == "semantic")
        return hits

    return asyncio.run(run())


def test_test_half_false_hits_and_recall_through_the_stage(embedder):
    near = [p for p in TEST_HALF if p["label"] == "near_miss"]
    para = [p for p in TEST_HALF if p["label"] == "paraphrase"]
    near_hits = _hits_through_the_stage(embedder, near)
    para_hits = _hits_through_the_stage(embedder, para)
    false_hits = [p for p, hit in zip(near, near_hits) if hit]
    # Measured with the defaults (docs/gateway.md): 1 false hit of 106, recall 0.63.
    assert len(false_hits) <= len(near) // 100, false_hits
    assert sum(para_hits) / len(para) >= 0.60


def test_regression_sample_near_misses_never_hit(embedder):
    old = json.loads((REPO / "tests" / "gateway" / "semantic_pairs.json").read_text())
    pairs = [{"cached": a, "asked": b} for a, b, *_ in old["near_misses"]]
    assert not any(_hits_through_the_stage(embedder, pairs))


def test_tenant_threshold_overrides_the_cache_threshold(upstreams, start_gateway):
    (fake, server), _ = upstreams
    config = base_config([server.url])
    config["tenants"][1]["semantic_cache_threshold"] = 0.999  # beta: near-exact only
    gw = start_gateway(config)
    for key in (KEY_ACME, KEY_BETA):
        chat(gw.client(key), "How do I reset my password?")
    acme = chat(gw.client(KEY_ACME), "How can I reset my password?")
    beta = chat(gw.client(KEY_BETA), "How can I reset my password?")
    assert acme.headers["x-tokenmill-cache"] == "semantic"
    assert float(acme.headers["x-tokenmill-cache-similarity"]) < 0.999
    assert "x-tokenmill-cache" not in beta.headers
    assert fake.num_requests == 3
