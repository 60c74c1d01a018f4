"""Ray Serve cases; run only by ``test_ray_serve.py`` inside a fresh network namespace (``unshare -n``
with only ``lo`` up), never collected on their own (the file name has no ``test_`` prefix).

One local Ray cluster (2 CPUs, node address 127.0.0.1) for the module; the application is
redeployed per scenario (2 replicas with prefix affinity; then rank 0 slowed 2x by fault
injection; then autoscaling 1..2) with the same replica options, so replicas are not reloaded. Replicas run the built-in model with one torch thread.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve

from tokenmill.config import CacheConfig, EngineConfig
from tokenmill.distributed.ray_serve import APP_NAME, build_application
from tokenmill.distributed.ray_serve_config import FaultSettings, RayServeSettings
from tokenmill.distributed.ray_serve_replica import PREFIX_HITS_HEADER, REPLICA_HEADER
from tokenmill.server.state import ServerSettings

SERVER = ServerSettings(engine=EngineConfig(cache=CacheConfig(kv_cache_memory=2**27),
                                            num_threads=1), shutdown_timeout=5.0)
MODEL = "SmolLM2-135M-Instruct"  # the built-in model
SHARED_PREFIX = ("You are a careful assistant for a shipping company. Answer in one short "
                 "sentence, name the warehouse, never invent tracking numbers, and keep a calm "
                 "tone. Warehouses: Rotterdam, Lyon, Porto, Gdansk, Bilbao, Tallinn, Genoa. ")
SHARED_PREFIX *= 2  # longer than the router's 256-character key and several KV blocks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll ``condition`` (a state change in another process) until true, or fail."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s:.0f} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def url():
    # The networking rule: nothing but loopback exists here, and Ray must say so too.
    assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _deploy(**overrides) -> None:
    """Every scenario keeps the same router and replica options, so a redeploy only changes the
    replica count, autoscaling or fault injection (``user_config``): no replica reloads."""
    settings = RayServeSettings(**{"num_replicas": 2, "stats_period_s": 0.5,
                                   "health_check_period_s": 1.0, "affinity_max_imbalance": 3,
                                   "straggler_persistence": 2, **overrides})
    serve.run(build_application(SERVER, settings), name=APP_NAME, route_prefix="/")


def _replica_states() -> dict[str, int]:
    app = serve.status().applications[APP_NAME]
    return dict(app.deployments["TokenmillReplica"].replica_states)


def _complete(url: str, prompt: str, max_tokens: int = 8) -> httpx.Response:
    response = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def two_replicas(url):
    _deploy()
    assert _replica_states() == {"RUNNING": 2}
    _complete(url, "Hello")  # the ingress's router starts with its first request
    # ... and learns of replicas asynchronously (Ray's long poll): wait until it knows both
    _wait_for(lambda: len(httpx.get(url + "/ray/fleet").json()["replicas"]) == 2, 60,
              "the router to know both replicas")
    return url


def test_two_replicas_serve_the_openai_client(two_replicas):
    client = openai.OpenAI(base_url=two_replicas + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="The capital of France is",
                                           max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens >= 1
    # both replicas answer: unrelated prompts spread over them
    names = {_complete(two_replicas, f"Item {i}: {i * 7919} apples and").headers[REPLICA_HEADER]
             for i in range(12)}
    assert len(names) == 2, names


def test_prefix_affinity_lands_on_one_replica_until_the_load_cap(two_replicas):
    first = _complete(two_replicas, SHARED_PREFIX + "Where is parcel 1?")
    owner = first.headers[REPLICA_HEADER]
    hits = int(first.headers[PREFIX_HITS_HEADER])
    for i in range(2, 5):
        response = _complete(two_replicas, SHARED_PREFIX + f"Where is parcel {i}?")
        assert response.headers[REPLICA_HEADER] == owner
        assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert int(response.headers[PREFIX_HITS_HEADER]) > hits  # its hit counter moves
        hits = int(response.headers[PREFIX_HITS_HEADER])
    # 8 long requests at once: the owner takes them until it has 3 more in flight than the
    # other replica (the load cap), then the rest spill over.
    def long_request(i: int) -> str:
        response = httpx.post(two_replicas + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": SHARED_PREFIX + f"Parcel {i} status?", "max_tokens": 96,
            "ignore_eos": True, "temperature": 0})
        assert response.status_code == 200, response.text
        return response.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(8) as pool:
        landed = Counter(pool.map(long_request, range(8)))
    assert landed[owner] >= 3 and len(landed) == 2, landed
    fleet = httpx.get(two_replicas + "/ray/fleet").json()
    assert fleet["affinity_fallbacks"] >= 1, fleet


def test_killing_a_replica_loses_no_request_and_it_comes_back(two_replicas):
    victim = _complete(two_replicas, "Count to three:").headers[REPLICA_HEADER]
    before = set(httpx.get(two_replicas + "/ray/fleet").json()["replicas"])
    prompts = [f"Story {i}: once upon a time" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_complete, two_replicas, p, 48) for p in prompts]

        def victim_busy() -> bool:
            replicas = httpx.get(two_replicas + "/ray/fleet").json()["replicas"].values()
            return any(r.get("name") == victim and r["outstanding"] > 0 for r in replicas)

        _wait_for(victim_busy, 60, f"requests in flight on {victim}")
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result() for f in futures]  # none lost: each answered in full
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in results)
    assert victim not in {r.headers[REPLICA_HEADER] for r in results}
    _wait_for(lambda: _replica_states() == {"RUNNING": 2}, 120, "a replacement replica")
    _wait_for(lambda: set(httpx.get(two_replicas + "/ray/fleet").json()["replicas"]) - before,
              60, "the router to know the new replica")


def test_a_replica_slowed_twofold_is_marked_degraded_and_gets_less_traffic(url):
    _deploy(faults=FaultSettings(step_delay_factor=2.0, replica_ranks=(0,)))
    replicas = {}

    def fleet() -> dict:
        nonlocal replicas
        snapshot = httpx.get(url + "/ray/fleet").json()
        replicas = snapshot["replicas"]
        return snapshot

    def request(i: int) -> str:
        return _complete(url, f"Question {i}: why is the sky blue?", 16).headers[REPLICA_HEADER]

    with ThreadPoolExecutor(4) as pool:
        deadline = time.monotonic() + 90
        while not any(r.get("degraded") for r in fleet()["replicas"].values()):
            assert time.monotonic() < deadline, f"no replica marked degraded: {replicas}"
            list(pool.map(request, range(8)))
        degraded = [r for r in replicas.values() if r.get("degraded")]
        assert [r["rank"] for r in degraded] == [0], replicas
        slow_name = degraded[0]["name"]
        landed = Counter(pool.map(request, range(24)))
    fast = [name for name in landed if name != slow_name]
    assert landed[slow_name] < sum(landed[n] for n in fast), landed
    events = fleet()["degraded_events"]
    assert any(degraded_flag for _, _, degraded_flag, _ in events)
    metrics = httpx.get(url + "/ray/metrics").text
    assert "tokenmill:replica_degraded" in metrics and "tokenmill:replica_utilization_perc" \
        in metrics


def test_autoscaling_goes_from_one_to_two_replicas_and_back(url):
    _deploy(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5,
            downscale_delay_s=1.0, autoscaling_interval_s=0.5)
    _wait_for(lambda: _replica_states() == {"RUNNING": 1}, 120, "idle: down to 1 replica")
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set():
            _complete(url, f"Load {i}: tell me about rivers", max_tokens=32)

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load, i) for i in range(4)]
        try:
            _wait_for(lambda: _replica_states() == {"RUNNING": 2}, 120, "scale up to 2")
        finally:
            stop.set()
        for worker in workers:
            worker.result()
    _wait_for(lambda: _replica_states() == {"RUNNING": 1}, 120, "scale back down to 1")
