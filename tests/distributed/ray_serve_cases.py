"""Ray Serve cases; run only by ``test_ray_serve.py`` inside a fresh network namespace (``unshare -n``
with only ``lo`` up), never collected on their own (the file name has no ``test_`` prefix).

The first case runs the real ``tokenmill serve --ray`` with its own cluster, before the module's
shared one (2 CPUs, node address 127.0.0.1) starts. On that one the application is deployed
three times only (each ``serve.run`` is a rolling restart in Ray 2.60, a replica load each): 2
replicas with prefix affinity; then, rolled out while answers stream, rank 0 slowed 2x by fault
injection (marked degraded, it gets no request, only recovery probes); then autoscaling 1..2. Replicas run the built-in model with one torch thread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
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


def _assert_loopback_only() -> None:
    # The networking rule: nothing but loopback exists here.
    assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()


def test_the_cli_serves_the_openai_client_and_exits_cleanly_on_sigterm(tmp_path):
    """``tokenmill serve --ray`` as a user runs it: its own local cluster, then SIGTERM.

    First in the file, so its cluster is gone before the module's shared one starts."""
    _assert_loopback_only()
    port = _free_port()
    log = (tmp_path / "serve.log").open("w+")
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--ray", "--num-replicas", "1",
               "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory", str(2**27),
               "--num-threads", "1", "--shutdown-timeout", "5", "--ray-stats-period-s", "0.5"]
    server = psutil.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    try:
        def answering() -> bool:
            assert server.poll() is None, "the server exited early"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code \
                    == 200
            except httpx.HTTPError:
                return False

        _wait_for(answering, 240, "tokenmill serve --ray to answer")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0)
        completion = client.completions.create(model=MODEL, prompt="The capital of France is",
                                               max_tokens=4, temperature=0)
        assert completion.choices[0].text and completion.usage.completion_tokens == 4
        # Everything Ray started (GCS, raylet, workers, replica actors) is below the server.
        tree = server.children(recursive=True)
        assert any("raylet" in p.name() for p in tree), [p.name() for p in tree]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    except BaseException:
        log.seek(0)
        print(log.read()[-8000:])
        raise
    finally:
        if server.poll() is None:
            server.kill()
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive, [(p.pid, p.name()) for p in alive]


@pytest.fixture(scope="module")
def url():
    _assert_loopback_only()
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


STRAGGLER = FaultSettings(step_delay_factor=2.0, replica_ranks=(0,))  # rank 0 slowed 2x
_deployed: list[dict] = []  # the overrides of the application running now


def _deploy(**overrides) -> None:
    """Deploy 2 replicas (or ``overrides``), unless exactly this is running already: in Ray 2.60
    every ``serve.run`` of a Python application is a rolling restart of all its deployments
    (each gets a new internal version), which costs a replica load per replica."""
    if _deployed == [overrides]:
        return
    settings = RayServeSettings(**{"num_replicas": 2, "stats_period_s": 0.5,
                                   "health_check_period_s": 1.0, "affinity_max_imbalance": 3,
                                   "straggler_persistence": 2, "straggler_probe_interval_s": 1.0,
                                   **overrides})
    _deployed[:] = []
    serve.run(build_application(SERVER, settings), name=APP_NAME, route_prefix="/")
    _deployed[:] = [overrides]


def _replica_states() -> dict[str, int]:
    app = serve.status().applications[APP_NAME]
    return dict(app.deployments["TokenmillReplica"].replica_states)


def _replica_actor_names() -> set[str]:
    """The live engine replicas' actor names (what the replicas put in their answers' header)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#TokenmillReplica#"
    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(prefix)}


def _complete(url: str, prompt: str, max_tokens: int = 8) -> httpx.Response:
    response = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response


@pytest.fixture(scope="module")
def two_replicas(url):
    # Straggler factor 3 in the cases without fault injection: on this shared 2-core box the
    # replicas' step times differ by more than 1.3x now and then (two engines, Ray and other work
    # on 2 cores), and at 1.3x with these fast settings an unfaulted replica was marked degraded,
    # which now costs it every request until its probes clear it (NOTES-s24-straggler.md).
    _deploy(straggler_factor=3.0)
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
    fleet = httpx.get(two_replicas + "/ray/fleet").json()
    assert landed[owner] >= 3 and len(landed) == 2, (landed, fleet)
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


def _stream(url: str, prompt: str, max_tokens: int, started: threading.Event | None = None
            ) -> tuple[str, int]:
    """One streamed completion read to its end: (replica, completion tokens of its usage)."""
    with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        if started is not None:
            started.set()  # the head comes with the first token: this stream has begun
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]", events[-3:]
    return r.headers[REPLICA_HEADER], json.loads(events[-2])["usage"]["completion_tokens"]


def test_a_rolling_restart_loses_no_request(two_replicas):
    """A user rolls out changed settings by running the application again (``serve.run``; here
    fault injection switched on for the next case): Ray starts new replicas and drains the old
    ones (each drain may last ``shutdown_timeout``, 5 s here: far above a 48-token answer).
    Streams that had begun finish on their old replica, requests sent during the roll-out
    are all answered, and afterwards only new replicas answer."""
    old = _replica_actor_names()  # from Ray: the router's view may not name a new replica yet
    assert len(old) == 2, old
    starts = [threading.Event() for _ in range(4)]
    rolled = threading.Event()

    def during_roll_out(i: int) -> list[str]:
        names = []
        while not rolled.is_set():
            names.append(_complete(two_replicas, f"Roll {i}: {len(names)} birds and", 8)
                         .headers[REPLICA_HEADER])
        return names

    with ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, two_replicas, f"Stream {i}: list the seasons", 48, e)
                   for i, e in enumerate(starts)]
        for started, stream in zip(starts, streams, strict=True):
            _wait_for(lambda s=started, f=stream: s.is_set() or f.done(), 60, "a stream's start")
        assert all(e.is_set() for e in starts), [f.result() for f in streams]
        others = [pool.submit(during_roll_out, i) for i in range(2)]
        try:
            _deploy(faults=STRAGGLER)  # returns once the new replicas are RUNNING
        finally:
            rolled.set()
        finished = [s.result() for s in streams]
        answered = [name for o in others for name in o.result()]
    assert all(tokens == 48 for _, tokens in finished), finished  # none cut short
    assert {name for name, _ in finished} <= old, (finished, old)
    assert answered, "no request was sent during the roll-out"
    new = {_complete(two_replicas, f"After {i}: a short note").headers[REPLICA_HEADER]
           for i in range(6)}
    assert not new & old, (new, old)
    _wait_for(lambda: _replica_states() == {"RUNNING": 2}, 60, "the old replicas gone")


def test_a_replica_slowed_twofold_is_marked_degraded_and_takes_no_request_but_probes(url):
    """Degraded, rank 0 gets no user request while the healthy replica has room (4 in flight at
    most, capacity 32), and the ingress probes it so its step times keep moving."""
    _deploy(faults=STRAGGLER)  # already running after the roll-out case
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
        slow_id = slow_name.rpartition("#")[2]
        routed_before = fleet()["routed"].get(slow_id, 0)
        landed = Counter(pool.map(request, range(24)))
    assert landed[slow_name] == 0 and sum(landed.values()) == 24, landed
    snapshot = fleet()
    assert snapshot["routed"].get(slow_id, 0) == routed_before, snapshot["routed"]
    assert snapshot["routed_while_degraded"].get(slow_id, 0) == 0
    # recovery probes (one a second here) reach it, and are not counted as routed requests
    _wait_for(lambda: fleet()["probes"].get(slow_id, 0) >= 2, 60, "two recovery probes")
    assert fleet()["routed"].get(slow_id, 0) == routed_before
    assert replicas[slow_id]["degraded"], replicas  # its probes' steps are 2x too
    events = fleet()["degraded_events"]
    assert any(degraded_flag for _, _, degraded_flag, _ in events)
    metrics = httpx.get(url + "/ray/metrics").text
    for name in ("tokenmill:replica_degraded", "tokenmill:replica_utilization_perc",
                 "tokenmill:replica_probes_total", "tokenmill:replica_overflow_requests_total"):
        assert name in metrics, name


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
