"""Concurrent requests, client disconnects and /metrics, against the real server."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server.conftest import MODEL, metric, scrape
from tokenmill.sampling_params import SamplingParams
from tokenmill.sse_parser import iter_sse

PROMPTS = [f"{start}," for start in (
    "One, two, three", "Monday, Tuesday, Wednesday", "January, February, March", "A, B, C",
    "red, orange, yellow", "1, 2, 3", "10, 20, 30", "Mercury, Venus, Earth",
    "spring, summer, autumn", "north, east, south", "do, re, mi", "alpha, beta, gamma",
    "first, second, third", "2, 4, 6", "Jan, Feb, Mar", "breakfast, lunch")]


def wait_for(condition, deadline_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def idle_kv(url: str) -> bool:
    samples = scrape(url)
    return (metric(samples, "tokenmill:kv_cache_usage_perc") == 0.0
            and metric(samples, "tokenmill:num_requests_running") == 0.0)


def test_sixteen_concurrent_requests_are_batched_and_correct(async_client, tokenmill_server,
                                                             llm):
    before = scrape(tokenmill_server.url)
    params = {"model": MODEL, "temperature": 0, "max_tokens": 8}

    async def run_all():
        return await asyncio.gather(*(async_client.completions.create(prompt=p, **params)
                                      for p in PROMPTS))

    results = asyncio.run(run_all())
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8),
                            use_tqdm=False)
    assert [r.choices[0].text for r in results] == [e.outputs[0].text for e in expected]
    after = scrape(tokenmill_server.url)
    # The step histogram: some engine steps produced tokens for more than one sequence.
    steps = (metric(after, "tokenmill:iteration_sequences_count")
             - metric(before, "tokenmill:iteration_sequences_count"))
    single = (metric(after, "tokenmill:iteration_sequences_bucket", le="1.0")
              - metric(before, "tokenmill:iteration_sequences_bucket", le="1.0"))
    assert steps > single, "no engine step batched more than one sequence"
    assert (metric(after, "tokenmill:iteration_sequences_bucket", le="10.0")
            - metric(before, "tokenmill:iteration_sequences_bucket", le="10.0")) < steps, \
        "no step batched more than 10 of the 16 requests"
    generated = sum(r.usage.completion_tokens for r in results)
    assert (metric(after, "tokenmill:generation_tokens_total")
            - metric(before, "tokenmill:generation_tokens_total")) == generated


def test_disconnect_mid_stream_frees_kv_blocks(tokenmill_server):
    url = tokenmill_server.url
    wait_for(lambda: idle_kv(url), what="an idle engine before the test")
    before = scrape(url)
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 2000,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = iter_sse(response)  # kept: dropping it mid-stream would close the connection
        assert next(events).data
        assert metric(scrape(url), "tokenmill:kv_cache_usage_perc") > 0
    # leaving the block closed the connection mid-stream
    wait_for(lambda: idle_kv(url), what="KV usage back to idle after the disconnect")
    after = scrape(url)
    assert (metric(after, "tokenmill:request_success_total", finished_reason="abort")
            - metric(before, "tokenmill:request_success_total", finished_reason="abort")) == 1
    assert (metric(after, "tokenmill:generation_tokens_total")
            - metric(before, "tokenmill:generation_tokens_total")) < 2000


def test_disconnect_while_waiting_for_a_whole_answer_frees_kv_blocks(tokenmill_server):
    url = tokenmill_server.url
    wait_for(lambda: idle_kv(url), what="an idle engine before the test")
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 2000,
            "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_for(lambda: idle_kv(url), what="KV usage back to idle after the client gave up")


def test_metrics_parse_and_counters_move(client, tokenmill_server):
    before = scrape(tokenmill_server.url)
    result = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    after = scrape(tokenmill_server.url)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("tokenmill:prompt_tokens_total") == result.usage.prompt_tokens
    assert grew("tokenmill:generation_tokens_total") == 5
    assert grew("tokenmill:request_success_total", finished_reason="length") == 1
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "request_prompt_tokens",
                      "request_generation_tokens"):
        assert grew(f"tokenmill:{histogram}_count") == 1, histogram
    assert grew("tokenmill:inter_token_latency_seconds_count") == 4
    assert grew("tokenmill:request_generation_tokens_sum") == 5
    assert grew("tokenmill:prefix_cache_queries_total") >= result.usage.prompt_tokens
    assert grew("tokenmill:engine_steps_total") >= 5
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert ("tokenmill:" + gauge, ()) in after


def test_prefix_cache_hits_count_and_show_in_usage(client, tokenmill_server):
    prompt = "Repeat after me: " + "the quick brown fox jumps over the lazy dog " * 8
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    before = scrape(tokenmill_server.url)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    after = scrape(tokenmill_server.url)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64  # whole 16-token blocks of the shared prompt
    assert (metric(after, "tokenmill:prefix_cache_hits_total")
            - metric(before, "tokenmill:prefix_cache_hits_total")) == cached


def test_cost_metrics_follow_the_price(client, tokenmill_server):
    """The session server runs with --price-per-hour 3.6, $0.001 a second of uptime: the cost
    counter must grow by $0.001 for each second between two scrapes. The server reads its clock
    somewhere inside each scrape, so the growth is bounded by the gap between the scrapes and the
    span from the first's start to the second's end (both on the machine's monotonic clock)."""
    client.completions.create(model=MODEL, prompt="Cost check", max_tokens=4, temperature=0)
    t0 = time.monotonic()
    first = metric(scrape(tokenmill_server.url), "tokenmill:cost_dollars_total")
    t1 = time.monotonic()
    time.sleep(0.2)  # not synchronisation: only makes the interval measured long enough to read
    t2 = time.monotonic()
    later = scrape(tokenmill_server.url)
    t3 = time.monotonic()
    grown = metric(later, "tokenmill:cost_dollars_total") - first
    assert 0.001 * (t2 - t1) - 1e-9 <= grown <= 0.001 * (t3 - t0) + 1e-9
    assert metric(later, "tokenmill:price_per_hour_dollars") == 3.6
    for kind in ("prefill", "decode", "all"):
        assert metric(later, "tokenmill:cost_per_million_tokens_dollars", token_kind=kind) > 0
    # one bill, viewed per kind: fewer tokens of a kind means a higher price per token of it
    assert (metric(later, "tokenmill:cost_per_million_tokens_dollars", token_kind="all")
            < metric(later, "tokenmill:cost_per_million_tokens_dollars", token_kind="decode"))
