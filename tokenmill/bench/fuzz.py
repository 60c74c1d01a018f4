"""Fuzz a running server from its own ``/openapi.json`` with schemathesis (property-based).

For every route chosen (by default ``/v1/*``, ``/tokenize``, ``/detokenize``, ``/dashboard/data``
and ``/health``) it generates
``max_examples`` request bodies that fit the schema (positive) and as many that break it
(negative), sends each, and runs these checks on every answer:

* ``not_a_server_error``: no 5xx, ever;
* ``status_code_conformance``: the status is one the schema documents for the route;
* ``content_type_conformance`` / ``response_schema_conformance``: the body is what the schema
  says for that status (errors: OpenAI's ``{"error": {message, type, param, code}}``);
* ``negative_data_rejection``: a body that breaks the schema is refused with a 4xx (so the
  schema is no stricter than the server);
* ``openai_error_shape``: every 4xx carries exactly OpenAI's four error keys.

Generated bodies are kept cheap (``bound_generation``): ``n``, ``best_of`` and the output length
are capped, and a chat request without a length gets a small one. The server's own limits are
untouched; this only keeps a few hundred requests inside a minute on a small machine.

schemathesis and hypothesis are test tools (the ``dev`` extra); they are imported here, by
``fuzz_server``, not when tokenmill is imported.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ROUTES = ("/v1/", "/tokenize", "/detokenize", "/dashboard/data", "/health")
"""Path prefixes fuzzed unless told otherwise."""

CHECK_NAMES = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance", "negative_data_rejection", "openai_error_shape")
_ERROR_KEYS = {"message", "type", "param", "code"}
_MAX_SAMPLES = 3  # failing requests kept per check and route, for the report


@dataclass
class RouteReport:
    """What fuzzing one route found."""

    route: str
    """``"POST /v1/completions"``."""
    num_examples: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    """Check name -> number of examples that failed it."""
    samples: dict[str, list[str]] = field(default_factory=dict)
    """Check name -> a few failing requests with the answer, to reproduce."""

    def record_failure(self, check: str, detail: str) -> None:
        self.failures[check] += 1
        kept = self.samples.setdefault(check, [])
        if len(kept) < _MAX_SAMPLES:
            kept.append(detail)

    @property
    def num_failures(self) -> int:
        return sum(self.failures.values())


def bound_generation(path: str, body: Any, *, max_output_tokens: int = 4,
                     max_choices: int = 2) -> Any:
    """A generated body made cheap to answer, still of the kind it was (valid stays valid):
    integers over the caps are brought down to them, and a request whose output length is null
    or missing gets the cap."""
    if not isinstance(body, dict):
        return body
    body = dict(body)

    def cap(name: str, limit: int) -> None:
        value = body.get(name)
        # 16.0 is an integer to JSON Schema (and to the server), so floats are capped too.
        whole = isinstance(value, int) and not isinstance(value, bool) or \
            isinstance(value, float) and value.is_integer()
        if whole and value > limit:
            body[name] = limit

    for name in ("n", "best_of"):
        cap(name, max_choices)
    for name in ("max_tokens", "max_completion_tokens", "min_tokens", "max_output_tokens"):
        cap(name, max_output_tokens)
    # A null or missing length means "up to the end of the context" (completions' missing one:
    # 16): thousands of tokens per request.
    if path.endswith("/chat/completions"):
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_completion_tokens"] = max_output_tokens
    elif path.endswith("/completions") and body.get("max_tokens") is None:
        body["max_tokens"] = max_output_tokens
    elif path.endswith("/responses") and body.get("max_output_tokens") is None:
        body["max_output_tokens"] = max_output_tokens
    return body


def _openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    if not 400 <= response.status_code < 500:
        return None
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"a {response.status_code} whose body is not OpenAI's error shape: "
                             f"{response.content[:200]!r}") from None
    if not isinstance(error, dict) or set(error) != _ERROR_KEYS:
        raise AssertionError(f"error keys {sorted(error) if isinstance(error, dict) else error!r}"
                             f", expected {sorted(_ERROR_KEYS)}")
    if not isinstance(error["message"], str) or not error["message"]:
        raise AssertionError("the error has no message")
    return True


def _check_name(failure: Any) -> str:
    names = getattr(type(failure), "checks", ())
    if names:
        return names[0]
    return "openai_error_shape" if "OpenAI" in str(failure) or "error keys" in str(failure) \
        else str(getattr(failure, "title", type(failure).__name__))


def _describe(case: Any, response: Any) -> str:
    """One line to reproduce: method, formatted path, query and body, then the answer."""
    path = case.formatted_path
    if case.query:
        path += "?" + "&".join(f"{k}={v}" for k, v in case.query.items())
    text = json.dumps(case.body, default=repr) if isinstance(case.body, (dict, list)) else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    answer = ("no answer" if response is None else
              f"{response.status_code} {response.content[:300].decode('utf-8', 'replace')}")
    return f"{case.method.upper()} {path} {text} -> {answer}"


def _describe_failure(failure: Any, case: Any, response: Any) -> str:
    why = f"{failure.title}: {failure.message}".replace("\n", " ")
    why = why if len(why) <= 400 else why[:397] + "..."
    return f"{why}\n      {_describe(case, response)}"


def fuzz_server(url: str, *, max_examples: int = 20, routes: Iterable[str] = DEFAULT_ROUTES,
                seed: int | None = 0, negative: bool = True, max_output_tokens: int = 4,
                max_choices: int = 2, request_timeout: float = 120.0,
                progress: Callable[[RouteReport], None] | None = None) -> list[RouteReport]:
    """Fuzz every operation of ``url``'s schema whose path starts with one of ``routes``.

    ``max_examples`` bodies per route and generation mode (positive, and negative unless
    ``negative`` is False). ``seed`` makes a run repeatable (None: a fresh random run).
    """
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import Failure, FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    url = url.rstrip("/")
    schema = schemathesis.openapi.from_url(url + "/openapi.json", timeout=30)
    prefixes = tuple(routes)
    modes = [schemathesis.GenerationMode.POSITIVE]
    if negative:
        modes.append(schemathesis.GenerationMode.NEGATIVE)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, negative_data_rejection, _openai_error_shape]
    session = requests.Session()
    reports = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith(prefixes):
            continue
        report = RouteReport(f"{operation.method.upper()} {operation.path}")
        for mode in modes:
            _fuzz_operation(operation, mode, report, url, session, checks, max_examples, seed,
                            request_timeout, max_output_tokens, max_choices,
                            hypothesis, HealthCheck, Phase, Failure, FailureGroup)
        reports.append(report)
        if progress is not None:
            progress(report)
    return reports


def _fuzz_operation(operation: Any, mode: Any, report: RouteReport, url: str, session: Any,
                    checks: list[Any], max_examples: int, seed: int | None,
                    request_timeout: float, max_output_tokens: int, max_choices: int,
                    hypothesis: Any, HealthCheck: Any, Phase: Any, Failure: Any,
                    FailureGroup: Any) -> None:
    import requests

    try:
        strategy = operation.as_strategy(generation_mode=mode)
    except Exception:  # noqa: BLE001 - e.g. nothing to negate in a route without input
        return

    def one_example(case: Any) -> None:
        if isinstance(case.body, dict):
            case.body = bound_generation(operation.path, case.body,
                                         max_output_tokens=max_output_tokens,
                                         max_choices=max_choices)
        report.num_examples += 1
        try:
            response = case.call(base_url=url, session=session, timeout=request_timeout)
        except requests.RequestException as exc:
            report.record_failure("no_answer", f"{_describe(case, None)}: {exc!r}")
            return
        report.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            for failure in group.exceptions:
                report.record_failure(_check_name(failure), _describe_failure(failure, case,
                                                                              response))
        except Failure as failure:
            report.record_failure(_check_name(failure), _describe_failure(failure, case, response))

    settings = hypothesis.settings(
        max_examples=max_examples, deadline=None, database=None, derandomize=False,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are recorded, not raised
        suppress_health_check=list(HealthCheck), print_blob=False)
    test = hypothesis.given(case=strategy)(one_example)
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    try:
        settings(test)()
    except hypothesis.errors.Unsatisfiable:
        pass  # every generated case was filtered out: nothing to send in this mode
