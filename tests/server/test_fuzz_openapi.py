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

EXAMPLES_PER_MODE = 12  # per route, positive and negative each: ~150 requests, under a minute
FUZZED_ROUTES = ["POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
                 "GET /v1/requests/{request_id}/trace", "POST /tokenize", "POST /detokenize"]
# Statuses by the error classes a route can raise (EngineDeadError's may change; the schema
# follows the class).
_ENGINE = {str(EngineNotReadyError.status_code), str(EngineDeadError.status_code)}
_GENERATION = {"200", "400", "429", *_ENGINE}
EXPECTED_STATUSES = {
    ("/v1/completions", "post"): _GENERATION,
    ("/v1/chat/completions", "post"): _GENERATION,
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
