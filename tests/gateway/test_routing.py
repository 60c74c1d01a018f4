"""Routing over two real replicas: balancing, prefix affinity, failover and the circuit breaker."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

from tests.gateway.helpers import base_config, chat


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_least_outstanding_sends_new_work_to_the_idle_replica(upstreams, start_gateway):
    (fa, sa), (fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url]))
    fa.hold, fb.hold = threading.Event(), threading.Event()
    threads = [threading.Thread(target=chat, args=(gw.client(), f"q{i}", )) for i in range(4)]
    for i, t in enumerate(threads):
        t.start()
        wait_for(lambda i=i: fa.num_started + fb.num_started == i + 1)
    assert (fa.num_started, fb.num_started) == (2, 2)  # each new request went to the idle one
    fa.hold.set()
    fb.hold.set()
    for t in threads:
        t.join(10)


def test_round_robin_alternates(upstreams, start_gateway):
    (fa, sa), (fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url], routing={"policy": "round_robin"}))
    for i in range(6):
        chat(gw.client(), f"q{i}", temperature=0.5)
    assert (fa.num_requests, fb.num_requests) == (3, 3)


def test_prefix_affinity_keeps_a_prefix_on_one_replica(upstreams, start_gateway):
    (fa, sa), (_fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url], routing={"policy": "prefix_affinity",
                                                              "prefix_chars": 40}))
    system = "You are a helpful assistant for ACME. "
    replicas_by_prefix = {}
    for p in range(6):
        prefix = f"{p}: {system}"
        for i in range(3):
            gw.client().chat.completions.create(
                model="tiny", temperature=0.5, messages=[
                    {"role": "system", "content": prefix}, {"role": "user", "content": f"q{i}"}])
            last = "a" if fa.bodies and fa.bodies[-1]["messages"][1]["content"] == f"q{i}" \
                and fa.bodies[-1]["messages"][0]["content"] == prefix else "b"
            replicas_by_prefix.setdefault(prefix, set()).add(last)
    assert all(len(r) == 1 for r in replicas_by_prefix.values())
    assert {r for rs in replicas_by_prefix.values() for r in rs} == {"a", "b"}  # both used


def test_prefix_affinity_falls_back_when_preferred_is_busy(upstreams, start_gateway):
    (fa, sa), (fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url], routing={
        "policy": "prefix_affinity", "affinity_max_imbalance": 2}))
    fa.hold, fb.hold = threading.Event(), threading.Event()
    threads = [threading.Thread(target=chat, args=(gw.client(), "same prompt", ),
                                kwargs={"temperature": 0.5}) for _ in range(4)]
    for i, t in enumerate(threads):
        t.start()
        wait_for(lambda i=i: fa.num_started + fb.num_started == i + 1)
    counts = sorted((fa.num_started, fb.num_started))
    assert counts == [1, 3]  # two on the preferred one, then the spill-over alternates
    assert gw.state.router.num_affinity_fallbacks >= 1
    fa.hold.set()
    fb.hold.set()
    for t in threads:
        t.join(10)


def test_killed_replica_is_routed_around_without_failed_requests(upstreams, start_gateway):
    (_fa, sa), (_fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url], routing={"failure_threshold": 2}))
    sb.stop()
    answers = [chat(gw.client(), f"q{i}", temperature=0.5).parse() for i in range(8)]
    assert all(a.choices[0].message.content.endswith("from a") for a in answers)
    replica_b = gw.state.router.replicas[1]
    assert replica_b.open_until > time.monotonic()  # circuit open: b is not tried any more
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'tokenmill_gateway_upstream_errors_total{kind="ConnectError",replica="r1"} 2.0' \
        in metrics
    assert 'tokenmill_gateway_upstream_healthy{replica="r1"} 0.0' in metrics


def test_5xx_before_first_byte_is_retried_elsewhere(upstreams, start_gateway):
    (fa, sa), (fb, sb) = upstreams
    gw = start_gateway(base_config([sa.url, sb.url], routing={"policy": "round_robin"}))
    fa.fail_status = 503
    for i in range(4):
        assert chat(gw.client(), f"q{i}", temperature=0.5).parse().choices[0].message.content \
            .endswith("from b")
    fb.fail_status = 500
    r = httpx.post(gw.url + "/v1/chat/completions", headers={
        "Authorization": f"Bearer {gw.client().api_key}"}, json={
        "model": "tiny", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    assert Counter(b["messages"][0]["content"] for b in fb.bodies)["x"] == 1


def test_half_open_circuit_lets_exactly_one_probe_through(upstreams, start_gateway):
    """After the cool-down one request probes the replica; requests arriving while it is out
    fail fast (no other replica here) instead of piling onto a replica that may still be down."""
    (fa, sa), _ = upstreams
    gw = start_gateway(base_config([sa.url], routing={"failure_threshold": 1,
                                                      "cooldown_s": 0.2}))
    headers = {"Authorization": f"Bearer {gw.client().api_key}"}

    def post(text: str) -> httpx.Response:
        return httpx.post(gw.url + "/v1/chat/completions", headers=headers, timeout=20, json={
            "model": "tiny", "temperature": 0.5, "messages": [{"role": "user", "content": text}]})

    fa.fail_status = 503
    assert post("fail").status_code == 503  # one failure opens the circuit
    replica = gw.state.router.replicas[0]
    wait_for(lambda: 0 < replica.open_until <= time.monotonic())  # cooled down: half-open
    fa.fail_status = None
    fa.hold = threading.Event()
    results: dict[str, httpx.Response] = {}
    probe = threading.Thread(target=lambda: results.__setitem__("probe", post("probe")))
    probe.start()
    wait_for(lambda: fa.num_started == 2)  # the probe is at the replica, held there
    others = [threading.Thread(target=lambda i=i: results.__setitem__(f"q{i}", post(f"q{i}")))
              for i in range(3)]
    for t in others:
        t.start()
    for t in others:
        t.join(15)
    assert fa.num_started == 2  # none of them reached the replica while the probe was out
    assert [results[f"q{i}"].status_code for i in range(3)] == [503] * 3
    assert all(results[f"q{i}"].json()["error"]["code"] == "upstream_unavailable"
               for i in range(3))
    fa.hold.set()
    probe.join(15)
    assert results["probe"].status_code == 200
    assert replica.open_until == 0.0 and replica.probe is None  # the probe closed the circuit
    assert [post(f"after{i}").status_code for i in range(2)] == [200, 200]
