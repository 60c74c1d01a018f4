"""Straggler handling in the gateway's router: an upstream whose step times (from its /metrics)
are persistently above the others' is marked degraded, takes only overflow (no request while a
healthy upstream has room), is named in a metric and a log line, and recovers through recovery
probes. The poller is driven by calling its ``poll`` (no timers): the gateway's
own poll interval is set far beyond the test."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.gateway.helpers import base_config, chat
from tokenmill.gateway.stragglers import StragglerWatch, parse_step_buckets
from tokenmill.routing_policy import PROBE_PROMPT


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


def user_requests(fake) -> int:
    """Requests the fake upstream got, recovery probes left out."""
    return sum(body.get("prompt") != PROBE_PROMPT for body in fake.bodies)


def probes(fake) -> int:
    return sum(body.get("prompt") == PROBE_PROMPT for body in fake.bodies)


def counter(gw, name: str, labels: str) -> float:
    text = httpx.get(gw.url + "/metrics").text
    prefix = f"{name}{{{labels}}}"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def engine_steps(url: str) -> float:
    """A real server's cumulative engine step count."""
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("tokenmill:engine_steps_total"))


def wait_until(condition, what: str, deadline_s: float = 30) -> None:
    """Waits on a condition another thread makes true (a deadline, not a sleep, decides)."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_slow_upstream_takes_only_overflow_and_recovers_through_probes(upstreams, start_gateway,
                                                                       caplog):
    (fa, sa), (fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url], routing={
        "straggler_poll_interval_s": 3600, "straggler_persistence": 3, "replica_capacity": 2}))
    watch = gw.state.stragglers
    # Comparable batches: both report buckets 1 and 16; r1's steps take 2x (bucket 64 is r1's
    # alone: nothing to compare it with, so it must not count).
    fast = {1: 0.010, 16: 0.030}
    fa.metrics_text = step_metrics(fast)
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
    assert probes(fb) == 0  # not degraded when those polls began: no probe

    # The healthy replica has room (0 < capacity 2 in flight): the degraded one gets nothing.
    for i in range(20):  # least_outstanding alone would alternate 10/10
        chat(gw.client(), f"q{i}", temperature=0.5)
    assert (user_requests(fa), user_requests(fb)) == (20, 0)

    # The healthy replica full (2 held in flight): the next request overflows to r1.
    fa.hold = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(chat, gw.client(), f"held {i}", temperature=0.5) for i in range(2)]
        wait_until(lambda: fa.num_started == 22, "both requests held on r0")
        chat(gw.client(), "overflow", temperature=0.5)
        assert user_requests(fb) == 1
        fa.hold.set()
        for future in held:
            future.result()
    assert counter(gw, "tokenmill_gateway_upstream_degraded_requests_total",
                   'replica="r1"') == 1
    chat(gw.client(), "room again", temperature=0.5)  # r0 has room again: back to it
    assert (user_requests(fa), user_requests(fb)) == (23, 1)

    # Recovery: each poll first probes r1 (no user request reaches it now); still slow, it
    # stays degraded.
    poll(watch)
    assert probes(fb) == 1 and gw.state.router.degraded == {"r1"}
    # Its probes' steps are back at r0's speed (bucket 1 only, as a probe's decode steps are;
    # r0, busy with larger batches, reports no bucket 1 any more: its last figure counts).
    fa.metrics_text = step_metrics({16: 0.030})

    def answer(body: dict) -> str:
        if body.get("prompt") == PROBE_PROMPT:
            fb.metrics_text = step_metrics({1: 0.010}, steps=7)
        return "ok"

    fb.reply = answer
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenmill.routing_policy"):
        for _ in range(3):
            poll(watch)
    assert gw.state.router.degraded == set()
    assert degraded_metric(gw, "r1") == 0.0
    recovered = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1 and "r1" in recovered[0]
    assert probes(fb) == 4 and probes(fa) == 0
    assert counter(gw, "tokenmill_gateway_upstream_probes_total",
                   'outcome="ok",replica="r1"') == 4
    poll(watch)
    assert probes(fb) == 4  # healthy again: no more probes
    before = user_requests(fb)
    for i in range(10):
        chat(gw.client(), f"r{i}", temperature=0.5)
    assert user_requests(fb) - before == 5
    assert user_requests(fa) + user_requests(fb) == 34  # probes were never user traffic


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


def test_real_server_slowed_2x_is_marked_gets_no_request_and_answers_probes(start_gateway,
                                                                           caplog):
    """Two real `tokenmill serve`, one with the fault-injection option slowing its steps 2x."""
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
        assert counts == {"r0": 8, "r1": 0}, counts  # r0 never full (capacity 64)
        steps_before = engine_steps(slow.url)
        poll(gw.state.stragglers)  # probes r1 first: a real server takes the probe
        assert counter(gw, "tokenmill_gateway_upstream_probes_total",
                       'outcome="ok",replica="r1"') == 1
        assert gw.state.router.degraded == {"r1"}  # its probe's steps are still 2x
        assert answered(gw, "r1") == 0  # a probe is not a user request
        assert engine_steps(slow.url) >= steps_before + 8  # the probe's prefill + 7 decode steps
    finally:
        fast.stop()
        slow.stop()
