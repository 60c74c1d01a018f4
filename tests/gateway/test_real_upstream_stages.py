"""The stages that depend on the upstream's exact stream shape, against a real `tokenmill serve`
(or TOKENMILL_GATEWAY_UPSTREAM_URL): output guardrails cutting a real stream, the token bucket
corrected from the real server's `usage`, and cached answers replayed in the real shape.

The fake upstream in the other tests writes the stream the way we think servers do; these check
the same stages on what a server actually sends (role-only first deltas, its chunking, its usage
chunk, its finish chunk).
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.gateway.helpers import KEY_BETA, base_config
from tokenmill.sse_parser import iter_sse

MAX_TOKENS = 16
PROMPT = "Write a short story about a dog who lives by the sea. Once upon a time"
CHUNK_OBJECT = {"chat": "chat.completion.chunk", "completions": "text_completion"}


def body_for(endpoint: str, model: str, **extra) -> dict:
    body = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS, **extra}
    if endpoint == "chat":
        return {**body, "messages": [{"role": "user", "content": PROMPT}]}
    return {**body, "prompt": PROMPT}


def path_for(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def answer_text(endpoint: str, body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if endpoint == "chat" else choice["text"]


def chunk_text(endpoint: str, chunk: dict) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def stream_chunks(url: str, endpoint: str, body: dict, key: str | None = None
                  ) -> tuple[httpx.Headers, list[dict]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", url + path_for(endpoint), json={**body, "stream": True},
                      headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        payloads = [sse.data for sse in iter_sse(r)]
    assert payloads[-1] == "[DONE]"
    return r.headers, [json.loads(p) for p in payloads[:-1]]


def post(url: str, endpoint: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + path_for(endpoint), json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


@pytest.fixture
def real(real_upstream_url) -> tuple[str, str]:
    model = httpx.get(real_upstream_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    return real_upstream_url, model


def beta_config(url: str, **sections) -> dict:
    config = base_config([url], **sections)
    config["tenants"][1]["models"] = ["*"]
    return config


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_output_rule_cuts_a_real_stream_at_the_match(real, start_gateway, endpoint):
    url, model = real
    direct = answer_text(endpoint, post(url, endpoint, body_for(endpoint, model)).json())
    words = [m for m in re.finditer(r"[A-Za-z]{3,}", direct) if m.start() > 0]
    if not words:
        pytest.skip(f"the model's answer has no word to filter on: {direct!r}")
    word = words[len(words) // 2].group()
    pattern = rf"\b{re.escape(word)}\b"
    cut = re.search(pattern, direct, re.IGNORECASE).start()
    gw = start_gateway(beta_config(url, guardrails={"output_rules": [
        {"name": "output.test_word", "pattern": pattern}]}, cache={"exact": False,
                                                                   "semantic": False}))
    _, chunks = stream_chunks(gw.url, endpoint, body_for(endpoint, model), KEY_BETA)
    assert "".join(chunk_text(endpoint, c) for c in chunks) == direct[:cut]
    with_choices = [c for c in chunks if c.get("choices")]
    assert with_choices[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert all(c["object"] == CHUNK_OBJECT[endpoint] for c in chunks)
    whole = post(gw.url, endpoint, body_for(endpoint, model), KEY_BETA).json()
    assert answer_text(endpoint, whole) == direct[:cut]
    assert whole["choices"][0]["finish_reason"] == "content_filter"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_token_bucket_is_corrected_from_the_real_usage(real, start_gateway, endpoint):
    """The caller does not ask for usage on its stream; the gateway asks the server for it
    anyway, charges the bucket the real total, and does not pass the usage chunk on."""
    url, model = real
    usage = post(url, endpoint, body_for(endpoint, model)).json()["usage"]
    config = beta_config(url, cache={"exact": False, "semantic": False})
    config["tenants"][1]["tokens_per_minute"] = 6_000
    gw = start_gateway(config)
    limiter = gw.state.limiter

    def charged(request) -> int:
        """What ``request()`` was charged: its estimate plus the correction from usage."""
        before = limiter.num_tokens_charged["beta"]
        request()
        deadline = time.monotonic() + 10
        while limiter.in_flight["beta"] and time.monotonic() < deadline:
            time.sleep(0.01)  # a stream's bookkeeping ends with the stream
        return limiter.num_tokens_charged["beta"] - before

    def streamed() -> None:
        _, chunks = stream_chunks(gw.url, endpoint, body_for(endpoint, model), KEY_BETA)
        assert all(c.get("usage") is None for c in chunks)  # not asked for, not sent

    assert charged(streamed) == usage["total_tokens"]
    assert charged(lambda: post(gw.url, endpoint, body_for(endpoint, model), KEY_BETA)) \
        == usage["total_tokens"]
    assert usage["completion_tokens"] > 0

@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_cached_real_stream_replays_in_the_real_shape(real, start_gateway, endpoint):
    """A streamed real answer is assembled into the cache, then served as JSON and as a stream
    with the server's own text, finish_reason and usage, and the endpoint's chunk object."""
    url, model = real
    direct_headers, direct = stream_chunks(url, endpoint, body_for(
        endpoint, model, stream_options={"include_usage": True}))
    direct_text = "".join(chunk_text(endpoint, c) for c in direct)
    direct_finish = [c["choices"][0]["finish_reason"] for c in direct if c.get("choices")][-1]
    direct_usage = direct[-1]["usage"]
    gw = start_gateway(beta_config(url, cache={"exact": True, "semantic": False}))
    first_headers, first = stream_chunks(gw.url, endpoint, body_for(
        endpoint, model, stream_options={"include_usage": True}), KEY_BETA)
    assert "x-tokenmill-cache" not in first_headers
    assert "".join(chunk_text(endpoint, c) for c in first) == direct_text
    whole = post(gw.url, endpoint, body_for(endpoint, model), KEY_BETA)
    assert whole.headers["x-tokenmill-cache"] == "exact"
    assert answer_text(endpoint, whole.json()) == direct_text
    assert whole.json()["choices"][0]["finish_reason"] == direct_finish
    assert whole.json()["usage"] == direct_usage
    replay_headers, replay = stream_chunks(gw.url, endpoint, body_for(
        endpoint, model, stream_options={"include_usage": True}), KEY_BETA)
    assert replay_headers["x-tokenmill-cache"] == "exact"
    assert "".join(chunk_text(endpoint, c) for c in replay) == direct_text
    assert [c["choices"][0]["finish_reason"] for c in replay if c.get("choices")][-1] \
        == direct_finish
    assert replay[-1]["usage"] == direct_usage and not replay[-1]["choices"]
    assert {c["object"] for c in replay} == {c["object"] for c in direct} \
        == {CHUNK_OBJECT[endpoint]}
    assert direct_headers.get("content-type", "").startswith("text/event-stream")
