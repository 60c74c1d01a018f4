"""Straggler handling in the gateway's router: an upstream whose step times (from its /metrics)
are persistently above the others' is marked degraded, gets less traffic, is named in a metric and
a log line, and recovers. The poller is driven by calling its ``poll`` (no timers): the gateway's
own poll interval is set far beyond the test."""

from __future__ import annotations

import asyncio
import logging

import httpx

from tests.gateway.helpers import base_config, chat
from tokenmill.gateway.stragglers import StragglerWatch, parse_step_buckets


def step_metrics(seconds_by_bucket: dict[int, float], steps: int = 40) -> str:
    """The lines a tokenmill server exports for its step meter (tokenmill/server/metrics.py)."""
    lines = ["# TYPE tokenmill:engine_bucket_step_seconds gauge"]
    lines += [f'tokenmill:engine_bucket_step_seconds{{model_name="tiny",batch_tokens="{b}"}} {s}'
              for b, s in seconds_by_bucket.items()]
    lines.append("# TYPE tokenmill:engine_bucket_steps gauge")
    lines += [f'tokenmill:engine_bucket_steps{{model_name="tiny",batch_tokens="{b}"}} {steps}'
              for b in seconds_by_bucket]
    return "\n".join(lines) + "\n"


def poll(watch: StragglerWatch) -> None:
    async def once() -> None:
        async with httpx.AsyncClient() as client:
            await watch.poll(client)
    asyncio.run(once())


def degraded_metric(gw, replica: str) -> float | None:
    text = httpx.get(gw.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(f'tokenmill_gateway_upstream_degraded{{replica="{replica}"}}'):
            return float(line.split()[-1])
    return None


def answered(gw, replica: str) -> float:
    """Answers the gateway got from ``replica`` (its upstream latency histogram's count)."""
    text = httpx.get(gw.url + "/metrics").text
    prefix = f'tokenmill_gateway_upstream_latency_seconds_count{{replica="{replica}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_slow_upstream_is_marked_gets_less_traffic_and_recovers(upstreams, start_gateway,
                                                                caplog):
    (fa, sa), (fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url], routing={
        "straggler_poll_interval_s": 3600, "straggler_persistence": 3,
        "straggler_weight": 0.25}))
    watch = gw.state.stragglers
    # Comparable batches: both report buckets 1 and 16; r1's steps take 2x (bucket 64 is r1's
    # alone: nothing to compare it with, so it must not count).
    fa.metrics_text = step_metrics({1: 0.010, 16: 0.030})
    fb.metrics_text = step_metrics({1: 0.020, 16: 0.060, 64: 0.001})
    with caplog.at_level(logging.WARNING, logger="tokenmill.routing_policy"):
        polls = 0
        while "r1" not in gw.state.router.degraded:
            assert polls < 3, "not marked within straggler_persistence polls"
            poll(watch)
            polls += 1
    assert gw.state.router.degraded == {"r1"}
    assert watch.detector.slowdown["r1"] == 2.0
    assert degraded_metric(gw, "r1") == 1.0 and degraded_metric(gw, "r0") == 0.0
    marked = [r.getMessage() for r in caplog.records if "is degraded" in r.getMessage()]
    assert len(marked) == 1 and "r1" in marked[0]

    for i in range(40):  # least_outstanding alone would alternate 20/20
        chat(gw.client(), f"q{i}", temperature=0.5)
    assert fb.num_requests == 5  # a quarter of its 20 first-choice picks: less, never zero
    assert fa.num_requests == 35

    fb.metrics_text = fa.metrics_text  # back in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenmill.routing_policy"):
        for _ in range(3):
            poll(watch)
    assert gw.state.router.degraded == set()
    assert degraded_metric(gw, "r1") == 0.0
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1 and "r1" in recovered[0]
    before = fb.num_requests
    for i in range(10):
        chat(gw.client(), f"r{i}", temperature=0.5)
    assert fb.num_requests - before == 5


def test_upstream_without_step_metrics_is_never_marked(upstreams, start_gateway):
    (fa, sa), (fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url],
                                   routing={"straggler_poll_interval_s": 3600}))
    fa.metrics_text = step_metrics({1: 0.010})
    fb.metrics_text = None  # a 404, like vLLM-less or any non-tokenmill server
    for _ in range(5):
        poll(gw.state.stragglers)
    assert gw.state.router.degraded == set()
    fb.metrics_text = "# TYPE other gauge\nother 1\n"  # metrics, but not tokenmill's
    for _ in range(5):
        poll(gw.state.stragglers)
    assert gw.state.router.degraded == set()
    assert parse_step_buckets(fb.metrics_text) == {}


def test_a_real_server_exports_the_step_buckets_the_gateway_reads(tokenmill_server):
    import openai

    client = openai.OpenAI(base_url=tokenmill_server.url + "/v1", api_key="x", max_retries=0)
    client.completions.create(model=client.models.list().data[0].id, prompt="Hello",
                              max_tokens=8, temperature=0)
    buckets = parse_step_buckets(httpx.get(tokenmill_server.url + "/metrics").text)
    assert buckets, "no tokenmill:engine_bucket_step_seconds lines"
    assert all(seconds > 0 and steps >= 1 for seconds, steps in buckets.values())
    assert sum(steps for _, steps in buckets.values()) >= 8  # the prefill + 7 decode steps


def test_real_server_slowed_2x_is_marked_and_gets_less_traffic(start_gateway, caplog):
    """Two real `tokenmill serve`, one with the fault-injection option slowing its steps 2x."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.gateway.helpers import KEY_BETA
    from tests.server_fixture import ServerProcess

    fast = ServerProcess()
    slow = ServerProcess("--inject-step-delay-factor", "2")
    try:
        with ThreadPoolExecutor(2) as pool:  # load both models at once
            list(pool.map(lambda s: s.wait_ready(), (fast, slow)))
        gw = start_gateway(base_config([fast.url, slow.url],
                                       routing={"straggler_poll_interval_s": 3600}))
        model = httpx.get(fast.url + "/v1/models").json()["data"][0]["id"]

        def generate(url: str) -> None:  # 1 prefill + 11 decode steps: bucket 1 gets 11
            httpx.post(url + "/v1/completions", timeout=60, json={
                "model": model, "prompt": "Once upon a time", "max_tokens": 12,
                "temperature": 0, "ignore_eos": True}).raise_for_status()

        with caplog.at_level(logging.WARNING, logger="tokenmill.routing_policy"):
            for polls in range(1, 5):  # fresh steps before every poll (a 10 s window)
                generate(fast.url)
                generate(slow.url)
                poll(gw.state.stragglers)
                if gw.state.router.degraded:
                    break
        assert gw.state.router.degraded == {"r1"}, gw.state.stragglers.detector.slowdown
        assert polls <= 4  # straggler_persistence (3) polls, one spare for a noisy machine
        assert degraded_metric(gw, "r1") == 1.0
        assert any("replica r1 is degraded" in r.getMessage() for r in caplog.records)

        client = gw.client(KEY_BETA)
        for i in range(8):  # sequential: least_outstanding alone would alternate 4/4
            client.completions.create(model=model, prompt=f"q{i}", max_tokens=2, temperature=0)
        counts = {r: answered(gw, r) for r in ("r0", "r1")}
        assert 1 <= counts["r1"] < counts["r0"], counts  # less, not cut off
    finally:
        fast.stop()
        slow.stop()
