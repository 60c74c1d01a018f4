"""The request trace over HTTP on the session server: the response id comes back in
``x-request-id``, ``GET /v1/requests/{id}/trace`` shows the timeline while the request runs and
after, 404s for unknown ids and for another tenant's requests, and the finished-request log line
carries the trace's summary."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.server.conftest import MODEL
from tokenmill.sse_parser import iter_sse

TENANT = "x-tokenmill-tenant"


def get_trace(server, request_id: str, tenant: str | None = None) -> httpx.Response:
    headers = {TENANT: tenant} if tenant is not None else {}
    return httpx.get(f"{server.url}/v1/requests/{request_id}/trace", headers=headers, timeout=30)


def test_completion_returns_its_id_in_a_header_and_its_trace(client: openai.OpenAI,
                                                             tokenmill_server) -> None:
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True})
    completion = raw.parse()
    assert raw.headers["x-request-id"] == completion.id
    response = get_trace(tokenmill_server, completion.id)
    assert response.status_code == 200
    trace = response.json()
    assert trace["id"] == completion.id and trace["status"] == "finished"
    [child] = trace["requests"]
    kinds = [e["event"] for e in child["events"]]
    assert kinds[:3] == ["queued", "admitted", "prefill"] and "first_token" in kinds
    assert kinds[-1] == "finished"
    finished = child["events"][-1]
    assert finished["num_output_tokens"] == completion.usage.completion_tokens == 5
    prefill = [e for e in child["events"] if e["event"] == "prefill"]
    assert sum(e["num_tokens"] for e in prefill) + child["events"][1]["num_cached_tokens"] \
        == completion.usage.prompt_tokens
    assert all(e["text"] for e in child["events"])
    assert trace["summary"].startswith("not queued")


def test_finished_request_log_line_summarizes_the_trace(client: openai.OpenAI,
                                                        tokenmill_server) -> None:
    completion = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3)
    wanted = f"request {completion.id} finished"
    deadline = time.monotonic() + 30
    while wanted not in tokenmill_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [ln for ln in tokenmill_server.log().splitlines() if wanted in ln]
    assert "; trace: not queued" in line


def test_streamed_chat_header_matches_chunk_ids_and_trace_is_live(client: openai.OpenAI,
                                                                  tokenmill_server) -> None:
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to a hundred."}],
            max_tokens=200, stream=True, extra_body={"ignore_eos": True}) as raw:
        request_id = raw.headers["x-request-id"]
        assert request_id.startswith("chatcmpl-")
        events = iter_sse(raw.http_response)  # kept: dropping it would close the connection
        assert request_id in next(events).data
        live = get_trace(tokenmill_server, request_id).json()
        assert live["status"] == "running"
        assert live["requests"][0]["events"][-1]["event"] != "finished"
    # closing the stream early aborts it; the trace stays and says so
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        trace = get_trace(tokenmill_server, request_id).json()
        if trace["status"] == "finished":
            break
        time.sleep(0.05)
    assert trace["requests"][0]["events"][-1]["finish_reason"] == "abort"


def test_n_samples_and_several_prompts_are_listed_under_the_response_id(
        client: openai.OpenAI, tokenmill_server) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=3)
    trace = get_trace(tokenmill_server, chat.id).json()
    assert [r["id"] for r in trace["requests"]] == [f"{chat.id}#0", f"{chat.id}#1"]
    assert trace["summary"].startswith("2 samples")

    completion = client.completions.create(model=MODEL, prompt=["a b c", "d e f"], max_tokens=2)
    trace = get_trace(tokenmill_server, completion.id).json()
    assert trace["id"] == completion.id
    assert [r["id"] for r in trace["requests"]] == [f"{completion.id}-0#0",
                                                    f"{completion.id}-1#0"]


def test_unknown_id_is_404_with_an_openai_error(tokenmill_server) -> None:
    response = get_trace(tokenmill_server, "cmpl-doesnotexist")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["param"] == "request_id" and "cmpl-doesnotexist" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_tenant_never_sees_another_tenants_request(client: openai.OpenAI, tokenmill_server,
                                                     stream: bool) -> None:
    kwargs = {"model": MODEL, "prompt": "Hello there", "max_tokens": 2,
              "extra_headers": {TENANT: "acme"}}
    if stream:
        with client.completions.with_streaming_response.create(stream=True, **kwargs) as raw:
            request_id = raw.headers["x-request-id"]
            for _ in raw.iter_lines():
                pass
    else:
        request_id = client.completions.create(**kwargs).id
    assert get_trace(tokenmill_server, request_id, tenant="beta").status_code == 404
    assert get_trace(tokenmill_server, request_id, tenant="acme").status_code == 200
    assert get_trace(tokenmill_server, request_id).status_code == 200  # direct access

    direct = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=2)
    assert get_trace(tokenmill_server, direct.id, tenant="acme").status_code == 404
