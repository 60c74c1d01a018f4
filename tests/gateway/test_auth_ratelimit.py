"""Auth (401/403, hashes only) and per-tenant rate limits (429 + Retry-After, restart-safe)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.gateway.helpers import KEY_ACME, KEY_BETA, base_config, chat
from tokenmill.cli import main
from tokenmill.errors import ConfigError
from tokenmill.gateway.config import config_from_dict
from tokenmill.gateway.ratelimit import RateLimiter


def test_missing_and_wrong_keys_get_the_same_401(upstreams, start_gateway):
    (fake, server), _ = upstreams
    gw = start_gateway(base_config([server.url]))
    with pytest.raises(openai.AuthenticationError) as wrong:
        chat(gw.client("tm-not-a-real-key"), "hi")
    with pytest.raises(openai.AuthenticationError) as almost:
        chat(gw.client(KEY_ACME[:-1] + "x"), "hi")
    assert wrong.value.body == almost.value.body  # nothing tells a near-miss from a wild guess
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert fake.num_requests == 0


def test_model_outside_the_allow_list_is_403(upstreams, start_gateway):
    (_fa, sa), (fb, sb) = upstreams
    fb.models = ["big"]
    gw = start_gateway(base_config([sa.url, sb.url]))
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'big'"):
        gw.client(KEY_ACME).chat.completions.create(
            model="big", messages=[{"role": "user", "content": "hi"}])
    assert fb.num_requests == 0


def test_keys_create_prints_key_once_and_config_holds_only_its_hash(capsys, upstreams,
                                                                     start_gateway):
    assert main(["gateway", "keys", "create", "--tenant", "newco"]) == 0
    out = capsys.readouterr().out
    key = next(w for w in out.split() if w.startswith("tm-"))
    hash_line = next(line for line in out.splitlines() if "sha256:" in line)
    key_hash = hash_line.split('"')[1]
    assert key not in key_hash
    config = base_config([upstreams[0][1].url])
    config["tenants"].append({"name": "newco", "api_key_hashes": [key_hash]})
    gw = start_gateway(config)
    assert chat(gw.client(key), "hi").parse().choices[0].message.content
    config["tenants"][-1]["api_key_hashes"] = [key]  # the key itself pasted in by mistake
    with pytest.raises(ConfigError, match=r"tenants\[3\]\.api_key_hashes\[0\].*never the key"):
        config_from_dict(config)


def test_request_burst_gets_429_with_retry_after_naming_the_limit(upstreams, start_gateway):
    """requests_per_minute is a moving window (limits' MovingWindowRateLimiter): exactly N in a
    minute pass, then 429 with Retry-After until the oldest of them is a minute old."""
    (_fake, server), _ = upstreams
    config = base_config([server.url])
    config["tenants"][0]["requests_per_minute"] = 30
    gw = start_gateway(config)
    client = gw.client()
    for i in range(30):
        chat(client, f"request {i}")
    started = time.time()
    with pytest.raises(openai.RateLimitError) as over:
        chat(client, "one too many")
    retry_after = int(over.value.response.headers["retry-after"])
    # The first of the 30 was sent before `started`, so it leaves the window within 60 s.
    assert 1 <= retry_after <= 60
    assert over.value.body["code"] == "requests_per_minute"
    assert over.value.body["message"] == (f"rate limit for tenant 'acme': over 30 requests per "
                                          f"minute; retry after {retry_after} s")
    assert time.time() - started < 60  # the window cannot have moved on meanwhile
    chat(gw.client(KEY_BETA), "another tenant is not affected")
    assert 'limit="requests_per_minute",tenant="acme"} 1.0' in httpx.get(gw.url + "/metrics").text


def test_tokens_per_minute_is_corrected_from_usage(upstreams, start_gateway):
    (fake, server), _ = upstreams
    config = base_config([server.url])
    config["tenants"][0]["tokens_per_minute"] = 1000
    gw = start_gateway(config)
    fake.completion_tokens = 1500  # a long answer: the prompt estimate alone would allow more
    chat(gw.client(), "short question")
    with pytest.raises(openai.RateLimitError) as over:
        chat(gw.client(), "short question 2")
    assert over.value.body["code"] == "tokens_per_minute"
    assert int(over.value.response.headers["retry-after"]) > 1


def test_concurrency_cap(upstreams, start_gateway):
    (fake, server), _ = upstreams
    config = base_config([server.url])
    config["tenants"][0]["max_concurrent"] = 1
    gw = start_gateway(config)
    fake.hold = threading.Event()
    first = threading.Thread(target=chat, args=(gw.client(), "slow"))
    first.start()
    deadline = time.monotonic() + 10
    while fake.num_started < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as over:
        chat(gw.client(), "second at once")
    assert over.value.body["code"] == "concurrency"
    fake.hold.set()
    first.join(10)
    assert chat(gw.client(), "after the first finished").parse().choices


def test_rate_limit_state_survives_restart(tmp_path, upstreams, start_gateway):
    (_fake, server), _ = upstreams
    config = base_config([server.url], server={"state_file": str(tmp_path / "state.json")})
    config["tenants"][0]["requests_per_minute"] = 5
    gw = start_gateway(config)
    for i in range(5):
        chat(gw.client(), f"r{i}")
    gw.server.stop()
    again = start_gateway(config)
    with pytest.raises(openai.RateLimitError):
        chat(again.client(), "right after the restart")


def test_a_slow_state_save_does_not_stall_other_requests(tmp_path, upstreams, start_gateway,
                                                         monkeypatch):
    """The periodic rate-limit state save writes a file; it runs off the event loop, so
    requests are answered while a save is stuck (a fault hook holds the write)."""
    (_fake, server), _ = upstreams
    write_started, release = threading.Event(), threading.Event()
    real_write = RateLimiter.write

    def slow_write(self, state):
        write_started.set()
        release.wait(30)
        real_write(self, state)

    monkeypatch.setattr(RateLimiter, "write", slow_write)
    state_file = tmp_path / "state.json"
    gw = start_gateway(base_config([server.url], server={"state_file": str(state_file)}))
    try:
        assert write_started.wait(30)  # the first periodic save (after ~1 s) is now stuck
        assert httpx.get(gw.url + "/health", timeout=10).status_code == 200
        answer = chat(gw.client(timeout=10), "answered while the save is stuck")
        assert answer.parse().choices[0].message.content
        assert not release.is_set() and not state_file.exists()  # the save had not finished
    finally:
        release.set()
    wait_until = time.monotonic() + 30
    while not state_file.exists():
        assert time.monotonic() < wait_until, "the held save never completed"
        time.sleep(0.05)
