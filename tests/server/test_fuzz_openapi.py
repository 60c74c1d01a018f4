"""The served ``/openapi.json`` describes reality, and schemathesis fuzzing it finds nothing.

The schema must document every status a route returns (with OpenAI's error body) and no 422; the
fuzz run (``tokenmill.bench.fuzz``, a bounded number of examples per route; the longer run is
``benchmarks/fuzz_server.py``) sends bodies that fit the schema and bodies that break it to a real
``tokenmill serve`` and requires: no 5xx, every status documented, every 4xx in OpenAI's error
shape, and every body that breaks the schema refused.
"""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL
from tokenmill.bench.fuzz import fuzz_server
from tokenmill.errors import EngineDeadError, EngineNotReadyError

EXAMPLES_PER_MODE = 20  # per route, positive and negative each: ~200 requests, under a minute
FUZZED_ROUTES = ["POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings",
                 "POST /v1/responses",
                 "GET /v1/models",
                 "GET /v1/requests/{request_id}/trace", "POST /tokenize", "POST /detokenize",
                 "GET /dashboard/data", "GET /health"]
# Statuses by the error classes a route can raise (EngineDeadError's may change; the schema
# follows the class).
_ENGINE = {str(EngineNotReadyError.status_code), str(EngineDeadError.status_code)}
_GENERATION = {"200", "400", "429", *_ENGINE}
EXPECTED_STATUSES = {
    ("/v1/completions", "post"): _GENERATION,
    ("/v1/chat/completions", "post"): _GENERATION,
    ("/v1/embeddings", "post"): _GENERATION,
    ("/v1/responses", "post"): _GENERATION,
    ("/v1/models", "get"): {"200", *_ENGINE},
    ("/tokenize", "post"): {"200", "400", *_ENGINE},
    ("/detokenize", "post"): {"200", "400", *_ENGINE},
    ("/v1/requests/{request_id}/trace", "get"): {"200", "404", "503"},
    ("/dashboard/data", "get"): {"200", "400"},
    ("/health", "get"): {"200", *_ENGINE},
    ("/metrics", "get"): {"200"},
}


@pytest.fixture(scope="module")
def schema(tokenmill_server) -> dict:
    return httpx.get(tokenmill_server.url + "/openapi.json").json()


def test_every_route_documents_the_statuses_it_returns_and_no_422(schema):
    documented = {(path, method): set(operation["responses"])
                  for path, operations in schema["paths"].items()
                  for method, operation in operations.items()}
    assert documented == EXPECTED_STATUSES
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in schema["paths"].values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status != "200":
                    assert response["content"]["application/json"]["schema"] == error_ref
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}
    retry_after = schema["paths"]["/v1/completions"]["post"]["responses"]["429"]["headers"]
    assert "Retry-After" in retry_after


def _property(schema: dict, model: str, name: str) -> dict:
    return schema["components"]["schemas"][model]["properties"][name]


def _members(prop: dict) -> list[dict]:
    return [m for m in prop.get("anyOf", [prop]) if m.get("type") != "null"]


def test_request_schemas_state_the_real_unions_and_ranges(schema):
    prompt = _members(_property(schema, "CompletionRequest", "prompt"))
    shapes = [(m["type"], m.get("items", {}).get("type")) for m in prompt]
    assert shapes == [("string", None), ("array", "string"), ("array", "integer"),
                      ("array", "array")]
    token_ids = prompt[2]["items"]
    assert token_ids["minimum"] == 0 and token_ids["maximum"] == 49151  # the loaded vocabulary
    assert _property(schema, "CompletionRequest", "model")["enum"] == [MODEL]
    [top_p] = _members(_property(schema, "CompletionRequest", "top_p"))
    assert top_p["exclusiveMinimum"] == 0 and top_p["maximum"] == 1
    assert _property(schema, "CompletionRequest", "presence_penalty")["minimum"] == -2
    [max_tokens] = _members(_property(schema, "ChatCompletionRequest", "max_completion_tokens"))
    assert max_tokens["minimum"] == 1 and max_tokens["maximum"] == 8192
    [logprobs] = _members(_property(schema, "ChatCompletionRequest", "top_logprobs"))
    assert (logprobs["minimum"], logprobs["maximum"]) == (0, 20)
    [bias] = _members(_property(schema, "CompletionRequest", "logit_bias"))
    assert bias["propertyNames"] == {"pattern": "^[0-9]+$"}
    assert bias["additionalProperties"]["maximum"] == 100
    stop = _members(_property(schema, "ChatCompletionRequest", "stop"))
    assert [m["type"] for m in stop] == ["string", "array"]
    content = _members(_property(schema, "ChatMessage", "content"))
    assert [m["type"] for m in content] == ["string", "array"]
    assert _property(schema, "DetokenizeRequest", "tokens")["items"]["maximum"] == 49151


def test_request_schemas_state_the_checks_across_fields(schema):
    def rules(model: str) -> list[dict]:
        return schema["components"]["schemas"][model]["allOf"]

    # exactly one of prompt / messages
    [tokenize_inputs] = rules("TokenizeRequest")
    assert [branch["required"] for branch in tokenize_inputs["anyOf"]] == [["prompt"],
                                                                          ["messages"]]
    stream_options_need_stream = {"anyOf": [
        {"properties": {"stream_options": {"type": "null"}}},
        {"properties": {"stream": {"const": True}}, "required": ["stream"]}]}
    assert stream_options_need_stream in rules("CompletionRequest")
    assert stream_options_need_stream in rules("ChatCompletionRequest")
    # echo with logprobs scores the prompt; max_tokens 0 with it scores the prompt only
    assert not any("echo" in str(rule) for rule in rules("CompletionRequest"))
    max_tokens = schema["components"]["schemas"]["CompletionRequest"]["properties"]["max_tokens"]
    assert {"type": "integer", "minimum": 0} in [
        {k: v for k, v in branch.items() if k in ("type", "minimum")}
        for branch in max_tokens["anyOf"]]


@pytest.fixture(scope="module")
def fuzz_reports(tokenmill_server) -> dict:
    reports = fuzz_server(tokenmill_server.url, max_examples=EXAMPLES_PER_MODE, seed=0)
    return {report.route: report for report in reports}


def test_every_route_is_fuzzed(fuzz_reports):
    assert sorted(fuzz_reports) == sorted(FUZZED_ROUTES)


@pytest.mark.parametrize("route", FUZZED_ROUTES)
def test_fuzzing_finds_no_5xx_and_no_undocumented_answer(fuzz_reports, route):
    report = fuzz_reports[route]
    assert report.num_examples >= 1
    assert not report.failures, "\n".join(
        f"{check} ({count}x): " + "\n    ".join(report.samples[check])
        for check, count in report.failures.items())
    assert not any(status >= 500 for status in report.statuses), report.statuses


def test_server_is_healthy_after_fuzzing(tokenmill_server, fuzz_reports):
    assert httpx.get(tokenmill_server.url + "/health").status_code == 200
    assert "Traceback" not in tokenmill_server.log()


def test_schema_before_the_model_loads_leaves_model_bounds_open():
    from tokenmill.config import EngineConfig
    from tokenmill.server.app import create_app
    from tokenmill.server.state import ServerSettings

    schema = create_app(ServerSettings(engine=EngineConfig())).openapi()  # no engine yet
    text = httpx.Response(200, json=schema).text
    assert "x-tokenmill-bound" not in text and '"enum":["SmolLM2' not in text
    assert _property(schema, "CompletionRequest", "model") == {"type": "string",
                                                               "title": "Model"}


# Regressions the fuzzer found, as plain requests.
@pytest.mark.parametrize("changes", [
    {"top_k": 20835500868236092150510518272},  # overflowed int64 in the sampler: engine died
    {"max_tokens": 2.0, "n": 1.0, "seed": 3.0, "prompt": [1.0, 2]},  # integers to JSON Schema
    {"prompt": [[1028.0, 4235], [2494]], "stop_token_ids": [5.0], "min_tokens": 1.0},
])
def test_found_by_fuzzing_now_answered(tokenmill_server, changes):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 1.0, **changes}
    response = httpx.post(tokenmill_server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert httpx.get(tokenmill_server.url + "/health").status_code == 200


@pytest.mark.parametrize(("changes", "param"), [
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"n": True}, "n"),
    ({"prompt": [1.5]}, "prompt"),
    ({"logit_bias": {" 5": 1}}, "logit_bias"),  # keys are ASCII digits, nothing else
    ({"logit_bias": {"\u0663": 1}}, "logit_bias"),  # Arabic-Indic 3 read as token 3
])
def test_what_the_schema_refuses_is_refused(tokenmill_server, changes, param):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **changes}
    response = httpx.post(tokenmill_server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_detokenize_takes_integral_floats(tokenmill_server):
    response = httpx.post(tokenmill_server.url + "/detokenize", json={"tokens": [28.0, 29]})
    assert response.status_code == 200, response.text
