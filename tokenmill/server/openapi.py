"""What ``/openapi.json`` says each route answers: the statuses the server really returns, each
error with OpenAI's body ``{"error": {message, type, param, code}}``, and no 422.

FastAPI documents a 422 for every route that takes a body or parameters; this server never sends
one (``error_handlers`` turns a body that does not fit into a 400, as OpenAI does), so it is
taken out of the generated schema along with its ``HTTPValidationError`` component. Generated
clients and fuzzers (``tests/server/test_fuzz_openapi.py``) read these statuses.

Once the model is loaded the schema also states what depends on it: the one model name served
(an enum), the largest token id and the largest output length (see ``schema_types``). Before
that those bounds are simply left open.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from tokenmill.errors import (
    EngineDeadError,
    EngineNotReadyError,
    InvalidRequestError,
    NotFoundError,
    RequestRejectedError,
    TokenmillError,
)
from tokenmill.server.openai.schema_types import (
    BOUND_MARKER,
    MODEL_BOUND,
    OUTPUT_LENGTH_BOUND,
    TOKEN_ID_BOUND,
)

if TYPE_CHECKING:
    from tokenmill.engine.async_llm import AsyncLLM


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, in a sentence a person can act on.")
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error.")
    param: str | None = Field(description="The request field at fault (messages[0].role).")
    code: str | None = Field(description="A stable machine-readable code, when there is one.")


class ErrorBody(BaseModel):
    """Every error the server sends, in OpenAI's shape."""

    error: ErrorDetail


# Why each error a route can raise happens; statuses come from the classes (errors.py), so a
# class that changes its status changes the schema with it.
_WHY: dict[type[TokenmillError], str] = {
    InvalidRequestError: "The request is not valid (a bad field, a prompt too long, an unknown "
                         "model); `param` names the field.",
    NotFoundError: "No such thing (or not visible to this tenant).",
    RequestRejectedError: "The server is overloaded; retry after `Retry-After` seconds.",
    EngineNotReadyError: "The model is still loading, failed to load, or the server is "
                         "shutting down.",
    EngineDeadError: "The engine stopped after an internal error.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer", "minimum": 1}}}


def error_responses(*errors: type[TokenmillError]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route that can raise ``errors``: each status with OpenAI's error
    body and why it happens."""
    responses: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        status = error.status_code
        entry = responses.setdefault(status, {"model": ErrorBody, "description": ""})
        entry["description"] = " Or: ".join(filter(None, [entry["description"], _WHY[error]]))
        if issubclass(error, RequestRejectedError):
            entry["headers"] = _RETRY_AFTER
    return dict(sorted(responses.items()))


_NEEDS_ENGINE = (EngineNotReadyError, EngineDeadError)  # state.require_engine()

# OpenAPI 3.1: the schema of an event stream describes one event.
_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "description": "One server-sent event (when `stream` is true): a JSON chunk, or an "
                   "`{\"error\": ...}` if the request fails after the stream began; the "
                   "last event's data is `[DONE]`.",
    "properties": {"data": {"type": "string"}}}}}

GENERATION_RESPONSES = {
    200: {"description": "The completion as JSON, or as server-sent events when `stream` is "
                         "true.", "content": {"application/json": {}, **_STREAM}},
    **error_responses(InvalidRequestError, RequestRejectedError, *_NEEDS_ENGINE),
}
"""/v1/completions and /v1/chat/completions: validated, then admitted into the engine."""

EMBEDDING_RESPONSES = {
    200: {"description": "One vector per input, in input order (OpenAI's embedding list)."},
    **error_responses(InvalidRequestError, RequestRejectedError, *_NEEDS_ENGINE),
}
"""/v1/embeddings: validated, then admitted into the engine (or the --task embed model)."""

ENGINE_RESPONSES = error_responses(InvalidRequestError, *_NEEDS_ENGINE)
"""Routes that validate a body and need the engine, but do not queue (tokenize, detokenize)."""

READ_RESPONSES = error_responses(*_NEEDS_ENGINE)
"""Routes without a body that need the running engine (/v1/models, /health)."""

TRACE_RESPONSES = error_responses(NotFoundError, EngineNotReadyError)
DASHBOARD_DATA_RESPONSES = error_responses(InvalidRequestError)


def _fill_bounds(node: Any, bounds: dict[str, dict[str, Any]]) -> Any:
    if isinstance(node, list):
        return [_fill_bounds(item, bounds) for item in node]
    if not isinstance(node, dict):
        return node
    filled = {key: _fill_bounds(value, bounds) for key, value in node.items()
              if key != BOUND_MARKER}
    if BOUND_MARKER in node:
        filled.update(bounds.get(node[BOUND_MARKER], {}))
    return filled


def _without_422(schema: dict[str, Any]) -> dict[str, Any]:
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def install_openapi(app: FastAPI, engine: Any) -> None:
    """Replace ``app.openapi`` (what ``/openapi.json`` serves). ``engine()`` returns the loaded
    engine or None; the schema with the model's bounds is built once, when it first is there."""
    generic: dict[str, Any] | None = None
    specialised: dict[str, Any] | None = None

    def openapi() -> dict[str, Any]:
        nonlocal generic, specialised
        if generic is None:
            app.openapi_schema = None
            generic = _without_422(FastAPI.openapi(app))
        if specialised is not None:
            return specialised
        loaded: AsyncLLM | None = engine()
        if loaded is None:
            return _fill_bounds(generic, {})
        specialised = _fill_bounds(copy.deepcopy(generic), model_bounds(loaded))
        return specialised

    app.openapi = openapi  # type: ignore[method-assign]


def model_bounds(engine: AsyncLLM) -> dict[str, dict[str, Any]]:
    return {
        MODEL_BOUND: {"enum": [engine.model_name]},
        TOKEN_ID_BOUND: {"maximum": engine.input_processor.vocab_size - 1},
        OUTPUT_LENGTH_BOUND: {"maximum": engine.max_model_len},
    }
