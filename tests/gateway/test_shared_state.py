"""Shared state in a real Redis: two real gateway processes enforce one tenant's limits and quota
together and share the exact cache; Redis dying or hanging mid-run takes the configured
``shared_state.on_failure`` path (open: pass uncounted; closed: 503), never a 500 or a hang."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.helpers import KEY_ACME, KEY_BETA, KEY_REDACT, base_config, chat
from tests.gateway.redis_support import GatewayProcess, RedisServer, redis_server_path
from tests.gateway.upstream_server import FakeUpstream, ServerThread

PREFIX = "tm-test"


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample of the gateway's /metrics, or None when it has none with these labels."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def statuses_seen(url: str) -> set[str]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.labels["status"] for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "tokenmill_gateway_requests_total"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[tuple[FakeUpstream, RedisServer, list[GatewayProcess]]]:
    """One Redis, one fake upstream, and two `tokenmill gateway` processes sharing them:
    acme has 6 requests/min, beta 1000 tokens/min, redactor no limits (its answers cached)."""
    redis_server_path()  # skips the module without the Debian package
    folder = tmp_path_factory.mktemp("shared-state")
    redis = RedisServer(folder).start()
    fake = FakeUpstream("a")
    upstream = ServerThread(fake.app).start()
    config = base_config([upstream.url], cache={"semantic": False},
                         shared_state={"redis_url": redis.url, "key_prefix": PREFIX})
    config["tenants"][0]["requests_per_minute"] = 6
    config["tenants"][1]["tokens_per_minute"] = 1000
    gateways = [GatewayProcess(config, folder, name) for name in ("a", "b")]
    try:
        for gw in gateways:  # both load the embedding model at once
            gw.launch()
        for gw in gateways:
            gw.wait_ready()
        yield fake, redis, gateways
    finally:
        for gw in gateways:
            gw.stop()
        upstream.stop()
        redis.kill()


def test_one_requests_per_minute_limit_holds_across_two_processes(fleet):
    _fake, redis, (a, b) = fleet
    outcomes = []
    for i in range(4):  # 4 to each process, alternating: 8 against a limit of 6
        for gw in (a, b):
            try:
                chat(client(gw.url, KEY_ACME), f"question {i} via {gw.url}")
                outcomes.append(200)
            except openai.RateLimitError as refused:
                outcomes.append(refused)
    assert outcomes[:6] == [200] * 6
    assert len(outcomes) == 8 and all(isinstance(o, openai.RateLimitError) for o in outcomes[6:])
    for refused in outcomes[6:]:
        assert refused.body["code"] == "requests_per_minute"
        assert "rate limit for tenant 'acme': over 6 requests per minute" in refused.body["message"]
        assert 1 <= int(refused.response.headers["retry-after"]) <= 60
    # One window, in Redis, under the documented key, expiring within the minute.
    key = f"{PREFIX}:ratelimit/acme/requests/6/1/minute"
    assert redis.client().llen(key) == 6
    assert 0 < redis.client().ttl(key) <= 60


def test_token_quota_is_shared(fleet):
    fake, _redis, (a, b) = fleet
    fake.completion_tokens = 1500  # the answer on A alone spends beta's 1000 tokens/min
    try:
        assert chat(client(a.url, KEY_BETA), "a short question").parse().choices
        with pytest.raises(openai.RateLimitError) as over:
            chat(client(b.url, KEY_BETA), "another short question")
    finally:
        fake.completion_tokens = None
    assert over.value.body["code"] == "tokens_per_minute"
    assert int(over.value.response.headers["retry-after"]) > 1


def test_answer_cached_by_one_process_is_a_hit_on_the_other(fleet):
    fake, redis, (a, b) = fleet
    question = "What is the capital of France?"
    keys_before = set(redis.client().keys(f"{PREFIX}:exact:*"))
    first = chat(client(a.url, KEY_REDACT), question)
    (key,) = set(redis.client().keys(f"{PREFIX}:exact:*")) - keys_before  # A stored it
    assert 0 < redis.client().ttl(key) <= 3600  # cache.ttl_s as Redis's expiry
    assert "x-tokenmill-cache" not in first.headers
    num_upstream = fake.num_requests
    again = chat(client(b.url, KEY_REDACT), question)
    assert again.headers["x-tokenmill-cache"] == "exact"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    streamed = client(b.url, KEY_REDACT).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": question}], temperature=0,
        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == first.parse().choices[0].message.content
    assert fake.num_requests == num_upstream  # neither hit went upstream


def _config(url: str, redis: RedisServer, mode: str) -> dict[str, Any]:
    config = base_config([url], cache={"semantic": False},
                         shared_state={"redis_url": redis.url, "on_failure": mode,
                                       "key_prefix": f"tm-{mode}", "timeout_s": 0.5,
                                       "retry_interval_s": 0.2})
    config["tenants"][0]["requests_per_minute"] = 100  # acme has limits, beta has none
    return config


@pytest.fixture
def redis(tmp_path) -> Iterator[RedisServer]:
    redis_server_path()
    server = RedisServer(tmp_path).start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.resume()  # a paused server would not die of SIGKILL's wait otherwise
    server.kill()


def _check_degraded(open_gw: Any, closed_gw: Any, num_requests: int) -> None:
    """What each mode does while Redis is away: open passes, closed refuses tenants with
    limits with a 503 naming the cause, and a tenant without limits passes in both."""
    for i in range(num_requests):
        assert chat(open_gw.client(timeout=60), f"while redis is away {i}").parse().choices
        with pytest.raises(openai.APIStatusError) as refused:
            chat(closed_gw.client(timeout=60), f"while redis is away {i}")
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "shared_state_unavailable"
        assert "on_failure is 'closed'" in refused.value.body["message"]
        assert chat(closed_gw.client(KEY_BETA, timeout=60), f"no limits {i}").parse().choices
    assert metric(open_gw.url, "tokenmill_gateway_shared_state_up") == 0
    assert metric(open_gw.url, "tokenmill_gateway_shared_state_fallbacks_total",
                  component="ratelimit", action="allowed") == num_requests
    assert metric(closed_gw.url, "tokenmill_gateway_shared_state_fallbacks_total",
                  component="ratelimit", action="refused") == num_requests
    for gw in (open_gw, closed_gw):
        assert "500" not in statuses_seen(gw.url)


def test_redis_killed_mid_run_fails_open_or_closed_as_configured(redis, upstreams,
                                                                 start_gateway):
    (_fake, server), _ = upstreams
    open_gw = start_gateway(_config(server.url, redis, "open"))
    closed_gw = start_gateway(_config(server.url, redis, "closed"))
    chat(open_gw.client(), "asked before redis died")
    for gw in (open_gw, closed_gw):
        assert chat(gw.client(), "through redis").parse().choices
    assert chat(open_gw.client(), "asked before redis died").headers["x-tokenmill-cache"] \
        == "exact"
    redis.kill()
    _check_degraded(open_gw, closed_gw, 4)
    # The exact cache is a miss while Redis is away (the upstream answers), never an error.
    again = chat(open_gw.client(), "asked before redis died")
    assert "x-tokenmill-cache" not in again.headers
    assert again.parse().choices[0].message.content.startswith("answer")
    # Redis back (empty, as after a crash without persistence): limits apply again.
    redis.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            chat(closed_gw.client(timeout=60), "after redis came back")
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.05)  # the gateway retries Redis after retry_interval_s (0.2 s)
    assert metric(closed_gw.url, "tokenmill_gateway_shared_state_up") == 1
    assert redis.client().llen("tm-closed:ratelimit/acme/requests/100/1/minute") == 1


def test_hung_redis_costs_a_bounded_wait_not_a_hung_request(redis, upstreams, start_gateway):
    """SIGSTOP: connections stay open but nothing answers; timeout_s bounds every call."""
    (_fake, server), _ = upstreams
    open_gw = start_gateway(_config(server.url, redis, "open"))
    closed_gw = start_gateway(_config(server.url, redis, "closed"))
    for gw in (open_gw, closed_gw):
        assert chat(gw.client(), "through redis").parse().choices
    redis.pause()
    try:
        _check_degraded(open_gw, closed_gw, 3)
        assert metric(open_gw.url, "tokenmill_gateway_shared_state_errors_total",
                      component="ratelimit") >= 1
    finally:
        redis.resume()


def test_in_memory_state_never_imports_redis():
    """Without shared_state.redis_url nothing imports redis-py (the default needs no Redis)."""
    code = ("import sys; from tokenmill.gateway.config import SharedStateSection; "
            "from tokenmill.gateway.metrics import GatewayMetrics; "
            "from tokenmill.gateway.ratelimit import RateLimiter; "
            "from tokenmill.gateway.exact_cache import ExactCacheStage; "
            "from tokenmill.gateway.shared_state import SharedState; "
            "SharedState(SharedStateSection(), GatewayMetrics()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'coredis')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"
