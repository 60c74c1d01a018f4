"""Pass-through: JSON and streamed answers, models, embeddings, health, metrics, bad input."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from tests.gateway.helpers import KEY_ACME, KEY_BETA, KEY_REDACT, base_config, chat


def test_chat_and_completion_pass_through(upstreams, start_gateway):
    (fake, server), _ = upstreams
    gw = start_gateway(base_config([server.url]))
    client = gw.client()
    answer = client.chat.completions.create(model="tiny", messages=[
        {"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content == "answer 1 from a"
    assert fake.bodies[-1]["messages"] == [{"role": "user", "content": "hello"}]
    completion = client.completions.create(model="tiny", prompt="once upon")
    assert completion.choices[0].text == "answer 2 from a"
    assert completion.usage.total_tokens > 0


def test_stream_is_passed_through_chunk_by_chunk(upstreams, start_gateway):
    (fake, server), _ = upstreams
    fake.reply = "one two three four"
    fake.gate = threading.Event()  # the upstream pauses after its first chunk until we say so
    gw = start_gateway(base_config([server.url]))
    stream = gw.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "count"}], stream=True)
    chunks = iter(stream)
    first = next(chunks)
    # The first word reached us while the upstream had not produced the rest: nothing buffered.
    assert first.choices[0].delta.content == "one "
    fake.gate.set()
    rest = list(chunks)
    text = "one " + "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert text == "one two three four"
    assert rest[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in rest)  # we did not ask for usage, so it is not sent


def test_stream_usage_when_asked(upstreams, start_gateway):
    (_fake, server), _ = upstreams
    gw = start_gateway(base_config([server.url]))
    chunks = list(gw.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def crlf_multiline_frame(data: str) -> str:
    """Legal SSE an upstream may send: CRLF line ends, comments, an event name, an id, and the
    JSON split over several data lines (joined again with newlines by the reader)."""
    lines = data if data == "[DONE]" else json.dumps(json.loads(data), indent=1)
    body = "".join(f"data:{line}\r\n" if i % 2 else f"data: {line}\r\n"
                   for i, line in enumerate(lines.split("\n")))
    return f": keep-alive\r\nevent: message\r\nid: 1\r\n{body}\r\n"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_any_legal_sse_framing_from_the_upstream_is_read(upstreams, start_gateway, endpoint):
    (fake, server), _ = upstreams
    fake.reply = "one two three"
    fake.frame = crlf_multiline_frame
    gw = start_gateway(base_config([server.url]))
    client = gw.client()
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "count"}], stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        chunks = list(client.completions.create(model="tiny", prompt="count", stream=True,
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_models_is_union_the_tenant_may_use(upstreams, start_gateway):
    (_fa, sa), (fb, sb) = upstreams
    fb.models = ["tiny", "big"]
    gw = start_gateway(base_config([sa.url, sb.url]))
    acme = {m.id for m in gw.client(KEY_ACME).models.list()}
    beta = {m.id for m in gw.client(KEY_BETA).models.list()}
    assert acme == {"tiny", "all-MiniLM-L6-v2"}
    assert beta == {"tiny", "big", "all-MiniLM-L6-v2"}
    answer = gw.client(KEY_BETA).chat.completions.create(
        model="big", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content.endswith("from b")  # only b serves "big"


def test_embeddings_use_the_local_model(upstreams, start_gateway):
    _, (_fake, server) = upstreams
    gw = start_gateway(base_config([server.url]))
    result = gw.client().embeddings.create(model="all-MiniLM-L6-v2",
                                           input=["a cat sits", "a cat is sitting", "tax law"])
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])


def test_bad_input_gets_clear_errors(upstreams, start_gateway):
    (fake, server), _ = upstreams
    gw = start_gateway(base_config([server.url], server={"max_body_bytes": 4096}))
    headers = {"Authorization": f"Bearer {KEY_ACME}", "Content-Type": "application/json"}
    with httpx.Client(base_url=gw.url, headers=headers) as http:
        r = http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = http.post("/v1/chat/completions", json={"model": "tiny"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "hi"}], "rag": "docs"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "rag"
    with pytest.raises(openai.BadRequestError, match="not served"):
        gw.client(KEY_BETA).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}])
    assert fake.num_requests == 0  # none of that reached the upstream


def test_upstream_4xx_passes_through_and_health_and_metrics(upstreams, start_gateway):
    (fake, server), _ = upstreams
    gw = start_gateway(base_config([server.url]))
    chat(gw.client(), "hello")
    fake.fail_status = 422
    with pytest.raises(openai.UnprocessableEntityError):
        chat(gw.client(), "hello again")
    assert httpx.get(gw.url + "/health").json()["upstreams"] == {"r0": True}
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'tokenmill_gateway_requests_total{endpoint="chat.completions",status="200",' \
           'tenant="acme"} 1.0' in metrics
    assert 'status="422"' in metrics
    assert 'tokenmill_gateway_stage_seconds_count{stage="auth"}' in metrics
    assert 'tokenmill_gateway_upstream_latency_seconds_count{replica="r0"}' in metrics


def test_against_real_upstream(start_gateway, real_upstream_url):
    url = real_upstream_url
    config = base_config([url])
    config["tenants"][1]["models"] = ["*"]
    gw = start_gateway(config)
    client = gw.client(KEY_BETA)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Say hello."}]
    first = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=8)
    second = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=8, stream=True)
    assert first.parse().choices[0].message.content
    assert second.headers.get("x-tokenmill-cache") == "exact"
    streamed = "".join(c.choices[0].delta.content or "" for c in second.parse() if c.choices)
    assert streamed == first.parse().choices[0].message.content


def test_a_tenant_reads_its_own_traces_through_the_gateway_and_no_one_elses(
        start_gateway, real_upstream_url):
    config = base_config([real_upstream_url])
    config["tenants"][1]["models"] = ["*"]
    config["tenants"][2]["models"] = ["*"]
    gw = start_gateway(config)
    beta = gw.client(KEY_BETA)
    model = beta.models.list().data[0].id
    answer = beta.completions.with_raw_response.create(
        model=model, prompt="A trace read through the gateway", max_tokens=4, temperature=0)
    request_id = answer.headers["x-request-id"]
    assert request_id == answer.parse().id

    def trace(key: str, rid: str = request_id) -> httpx.Response:
        return httpx.get(f"{gw.url}/v1/requests/{rid}/trace", timeout=30,
                         headers={"Authorization": f"Bearer {key}"})

    own = trace(KEY_BETA)
    assert own.status_code == 200, own.text
    assert own.json()["id"] == request_id and own.json()["status"] == "finished"
    assert own.json()["requests"][0]["events"][-1]["event"] == "finished"
    for other, status in ((KEY_REDACT, 404), ("not-a-key", 401)):
        refused = trace(other)
        assert refused.status_code == status
        assert request_id not in refused.text or status == 404
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert trace(KEY_BETA, "cmpl-unknown").status_code == 404
