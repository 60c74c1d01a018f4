"""A battery of bad requests: each gets its documented 4xx in OpenAI's error shape, naming the
parameter, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_CMPL = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def cmpl(**changes):
    return {**OK_CMPL, **changes}


def chat(**changes):
    return {**OK_CHAT, **changes}


def without(body, key):
    return {k: v for k, v in body.items() if k != key}


# (path, body, expected status, expected param, text the message must contain)
BAD = [
    (CMPL, cmpl(temperature="hot"), 400, "temperature", "number"),
    (CMPL, cmpl(temperature=-1), 400, "temperature", ">= 0"),
    (CMPL, cmpl(top_p=1.5), 400, "top_p", "(0, 1]"),
    (CMPL, cmpl(top_p=[1]), 400, "top_p", "number"),
    (CMPL, cmpl(n=0), 400, "n", "[1, 128]"),
    (CMPL, cmpl(n=1_000_000), 400, "n", "[1, 128]"),  # refused at once, not fanned out first
    (CHAT, chat(n=129), 400, "n", "[1, 128]"),
    (CMPL, cmpl(n="2"), 400, "n", "integer"),
    (CMPL, cmpl(n=1.5), 400, "n", "integer"),
    (CMPL, cmpl(max_tokens=0), 400, "max_tokens", "echo with logprobs"),
    (CMPL, cmpl(max_tokens=-5), 400, "max_tokens", ">= 1"),
    (CMPL, cmpl(max_tokens="10"), 400, "max_tokens", "integer"),
    (CMPL, cmpl(max_tokens=10**9), 400, "max_tokens", "8192"),
    (CMPL, cmpl(logprobs=50), 400, "logprobs", "[0, 20]"),
    (CMPL, cmpl(logprobs=True), 400, "logprobs", "integer"),
    (CMPL, cmpl(presence_penalty=3), 400, "presence_penalty", "[-2, 2]"),
    (CMPL, cmpl(frequency_penalty=-2.5), 400, "frequency_penalty", "[-2, 2]"),
    (CMPL, cmpl(logit_bias={"abc": 1}), 400, "logit_bias", "token id"),
    (CMPL, cmpl(logit_bias={"5": 500}), 400, "logit_bias", "[-100, 100]"),
    (CMPL, cmpl(logit_bias=[1, 2]), 400, "logit_bias", "dictionary"),
    (CMPL, cmpl(logit_bias={"49152": 1}), 400, "logit_bias", "outside the vocabulary [0, 49152)"),
    (CHAT, chat(logit_bias={"10000000": -100}), 400, "logit_bias", "outside the vocabulary"),
    (CMPL, cmpl(logit_bias={"\u00b2": 1}), 400, "logit_bias", "token id"),  # int("²") fails
    (CMPL, cmpl(stop_token_ids=[49152]), 400, "stop_token_ids", "outside the vocabulary"),
    (CMPL, cmpl(top_k=-2), 400, "top_k", "0 / -1"),
    (CMPL, cmpl(min_p=1.5), 400, "min_p", "[0, 1]"),
    (CMPL, cmpl(repetition_penalty=0), 400, "repetition_penalty", "> 0"),
    (CMPL, cmpl(min_tokens=-1), 400, "min_tokens", ">= 0"),
    (CMPL, cmpl(min_tokens=5), 400, "min_tokens", "max_tokens"),
    (CMPL, cmpl(seed="abc"), 400, "seed", "integer"),
    (CMPL, cmpl(stop=5), 400, "stop", "string"),
    (CMPL, cmpl(stop=[""]), 400, "stop", "non-empty"),
    (CMPL, cmpl(stream="yes"), 400, "stream", "boolean"),
    (CMPL, cmpl(echo=1), 400, "echo", "boolean"),
    (CMPL, cmpl(ignore_eos="no"), 400, "ignore_eos", "boolean"),
    (CMPL, cmpl(cache_salt=""), 400, "cache_salt", "at least 1"),
    (CMPL, cmpl(stream_options={"include_usage": True}), 400, "stream_options", "stream"),
    (CMPL, cmpl(suffix="end"), 400, "suffix", "not supported"),
    (CMPL, cmpl(best_of=3), 400, "best_of", "not supported"),
    (CMPL, cmpl(echo=True, logprobs=1, max_tokens=10**4), 400, "max_tokens", "8192"),
    (CMPL, cmpl(prompt_logprobs=21), 400, "prompt_logprobs", "[0, 20]"),
    (CMPL, cmpl(echo=True, logprobs=1, prompt=[5] * 5000), 400, "echo",
     "at most 4096 tokens (max_prompt_logprobs_len)"),
    (CMPL, cmpl(prompt_logprobs=1, prompt=[5] * 5000), 400, "prompt_logprobs",
     "at most 4096 tokens"),
    (CMPL, cmpl(max_token=5), 400, "max_token", "unknown"),
    (CMPL, without(OK_CMPL, "prompt"), 400, "prompt", "required"),
    (CMPL, without(OK_CMPL, "model"), 400, "model", "required"),
    (CMPL, cmpl(prompt=123), 400, "prompt", "token ids"),
    (CMPL, cmpl(prompt=[]), 400, "prompt", "token ids"),
    (CMPL, cmpl(prompt=[[1, 2], []]), 400, "prompt", "token ids"),
    (CMPL, cmpl(prompt=""), 400, "prompt", "empty"),
    (CMPL, cmpl(prompt=[1, -5]), 400, "prompt", "vocabulary"),
    (CMPL, cmpl(prompt=[10**7]), 400, "prompt", "vocabulary"),
    (CMPL, cmpl(prompt="word " * 9000), 400, "prompt", "8192"),
    (CMPL, cmpl(model="gpt-4"), 400, "model", "not served"),
    (CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    (CHAT, without(OK_CHAT, "messages"), 400, "messages", "required"),
    (CHAT, chat(messages="hi"), 400, "messages", "list"),
    (CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role",
     "system"),
    (CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role", "required"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content",
     "string"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                         "image_url": {"url": "x"}}]}]),
     400, "messages[0].content", "not supported"),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", ">= 1"),
    (CHAT, chat(max_completion_tokens=10**9), 400, "max_completion_tokens", "8192"),
    (CHAT, chat(logprobs=True, top_logprobs=30), 400, "top_logprobs", "[0, 20]"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs", "logprobs"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}}), 400,
     "tool_choice.function.name", "not in tools"),
    (CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type", "json_schema"),
    (CHAT, chat(guided_regex="(a"), 400, "guided_regex", "unclosed group"),
    (CMPL, cmpl(guided_choice=["a"], guided_regex="a"), 400, "guided_regex", "at most one"),
    (CHAT, chat(model="nope"), 400, "model", "not served"),
    (CHAT, chat(messages=[{"role": "user", "content": "word " * 9000}]), 400, "prompt",
     "8192"),
    ("/tokenize", {"model": MODEL}, 400, "prompt", "exactly one"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "vocabulary"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "list"),
]


def check_error(response: httpx.Response, status: int, param: str | None, text: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert text.lower() in error["message"].lower(), error
    assert error["type"] in ("invalid_request_error", "model_not_found")


@pytest.mark.parametrize(("path", "body", "status", "param", "text"), BAD,
                         ids=[f"{p}:{param}:{i}" for i, (p, _, _, param, _) in enumerate(BAD)])
def test_bad_request_gets_a_clear_4xx(tokenmill_server, path, body, status, param, text):
    response = httpx.post(tokenmill_server.url + path, json=body, timeout=60)
    check_error(response, status, param, text)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b"null", b'"text"'])
def test_malformed_bodies_are_400(tokenmill_server, raw):
    response = httpx.post(tokenmill_server.url + CMPL, content=raw,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_wrong_method(tokenmill_server):
    missing = httpx.post(tokenmill_server.url + "/v1/engines/davinci/completions", json={})
    assert missing.status_code == 404
    assert "no such route" in missing.json()["error"]["message"]
    wrong = httpx.get(tokenmill_server.url + CMPL)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["message"]


def test_server_still_serves_after_the_battery(client, tokenmill_server):
    for path, body, *_ in BAD[:5]:
        httpx.post(tokenmill_server.url + path, json=body)
    good = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0)
    assert good.choices[0].text and good.usage.completion_tokens == 3
    assert httpx.get(tokenmill_server.url + "/health").status_code == 200
    assert "Traceback" not in tokenmill_server.log()


def test_openai_client_raises_its_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-3)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="not served"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "Hi"}])
