"""Priority on a real server: with the one batch slot taken, urgent requests that arrive after a
queue of low-priority ones reach their first token before any of them, and the low ones still
finish. Both ways of asking are used: vLLM's body field, and the gateway's tenant header."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, metric, scrape
from tests.server_fixture import ServerProcess

NUM_EACH = 3


@pytest.fixture(scope="module")
def one_slot_server():
    server = ServerProcess("--max-num-seqs", "1", kv_cache_bytes=2**27).wait_ready()
    yield server
    server.stop()


async def wait_until(condition, what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_urgent_requests_get_their_first_token_before_queued_low_priority_ones(one_slot_server):
    url = one_slot_server.url
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                timeout=300)
    sent: dict[str, float] = {}
    first: dict[str, float] = {}
    finish: dict[str, str | None] = {}
    started: dict[str, asyncio.Event] = {}

    async def generate(name: str, max_tokens: int, body: dict[str, object],
                       headers: dict[str, str] | None = None) -> None:
        started[name] = asyncio.Event()
        sent[name] = time.monotonic()
        stream = await client.completions.create(
            model=MODEL, prompt=f"Request {name} says:", max_tokens=max_tokens, stream=True,
            temperature=0, extra_body={"ignore_eos": True, **body}, extra_headers=headers)
        async for chunk in stream:
            if name not in first:
                first[name] = time.monotonic()
                started[name].set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish[name] = chunk.choices[0].finish_reason

    async def num_waiting(expected: int) -> bool:
        samples = await asyncio.to_thread(scrape, url)
        return metric(samples, "tokenmill:num_requests_waiting") == expected

    async def scenario() -> None:
        # The blocker holds the only slot long enough for both groups to queue behind it.
        blocker = asyncio.create_task(generate("blocker", 160, {"priority": 1}))
        await wait_until(lambda: _event_set(started, "blocker"), "the blocker to start")
        lows = [asyncio.create_task(generate(f"low-{i}", 8, {"priority": 1}))
                for i in range(NUM_EACH)]
        await wait_until(lambda: num_waiting(NUM_EACH), "the low-priority requests to queue")
        # The gateway's tenant priority 5 (higher is more important) is engine priority -5.
        highs = [asyncio.create_task(generate(f"high-{i}", 8, {}, {"x-tokenmill-priority": "5"}))
                 for i in range(NUM_EACH)]
        await wait_until(lambda: num_waiting(2 * NUM_EACH), "the urgent requests to queue")
        assert "blocker" not in finish, "the blocker ended before everyone queued: lengthen it"
        await asyncio.gather(blocker, *lows, *highs)

    asyncio.run(scenario())

    low = [f"low-{i}" for i in range(NUM_EACH)]
    high = [f"high-{i}" for i in range(NUM_EACH)]
    assert all(finish[name] == "length" for name in [*low, *high, "blocker"]), finish
    # arrived later, served first: every urgent first token precedes every queued low one...
    assert max(first[name] for name in high) < min(first[name] for name in low)
    # ...so the time to first token of each urgent request is below each low-priority one's
    ttft = {name: first[name] - sent[name] for name in first}
    assert max(ttft[name] for name in high) < min(ttft[name] for name in low), ttft


async def _event_set(events: dict[str, asyncio.Event], name: str) -> bool:
    return name in events and events[name].is_set()


def test_a_bad_priority_header_or_body_is_a_400(one_slot_server):
    url = one_slot_server.url + "/v1/completions"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    response = httpx.post(url, json=body, headers={"x-tokenmill-priority": "urgent"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "x-tokenmill-priority"
    response = httpx.post(url, json={**body, "priority": "high"})
    assert response.status_code == 400, response.text
    assert "priority" in response.text
    response = httpx.post(url, json={**body, "priority": 2**40})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "priority"
