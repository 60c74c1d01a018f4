"""Field types whose published JSON schema states the ranges the server enforces.

``SamplingParams`` stays the one place that *validates* ranges (its messages name the field, the
value and what is allowed); these annotations only change what ``/openapi.json`` says, so that a
generated client or a fuzzer sends what the server accepts. Each bound comes from the constant
the validator uses.

Bounds that depend on the loaded model carry a marker (``x-tokenmill-bound``) that
``tokenmill/server/openapi.py`` fills in once the engine is up: the served model's name, the
vocabulary size (token ids) and the context length (output lengths).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from tokenmill.sampling_params import MAX_ABS_PENALTY, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N

BOUND_MARKER = "x-tokenmill-bound"
"""Key of a schema placeholder the server fills from the loaded model (see openapi.py)."""
MODEL_BOUND = "model_name"
TOKEN_ID_BOUND = "token_id"
OUTPUT_LENGTH_BOUND = "output_length"


def integral(value: Any) -> Any:
    """16.0 -> 16. JSON has one number type: JSON Schema counts 16.0 as an integer, and so does
    ``SamplingParams``; only a fractional part (or a bool) makes it not one."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_INTEGRAL = BeforeValidator(integral)


def _number(**bounds: float) -> dict[str, Any]:
    return {"type": "number", **bounds}


def _integer(**bounds: Any) -> dict[str, Any]:
    return {"type": "integer", **bounds}


_TOKEN_ID = _integer(minimum=0, **{BOUND_MARKER: TOKEN_ID_BOUND})
_TOKEN_IDS = {"type": "array", "items": _TOKEN_ID, "minItems": 1}
_PENALTY = _number(minimum=-MAX_ABS_PENALTY, maximum=MAX_ABS_PENALTY)

ModelName = Annotated[str, WithJsonSchema({"type": "string", BOUND_MARKER: MODEL_BOUND})]
Temperature = Annotated[float, WithJsonSchema(_number(minimum=0))]
TopP = Annotated[float, WithJsonSchema(_number(exclusiveMinimum=0, maximum=1))]
TopK = Annotated[int, _INTEGRAL, WithJsonSchema(_integer(minimum=-1))]
MinP = Annotated[float, WithJsonSchema(_number(minimum=0, maximum=1))]
Penalty = Annotated[float, WithJsonSchema(_PENALTY)]
RepetitionPenalty = Annotated[float, WithJsonSchema(_number(exclusiveMinimum=0))]
NumChoices = Annotated[int, _INTEGRAL, WithJsonSchema(_integer(minimum=1, maximum=MAX_N))]
MinTokens = Annotated[int, _INTEGRAL, WithJsonSchema(_integer(minimum=0))]
OutputLength = Annotated[int, _INTEGRAL, WithJsonSchema(
    _integer(minimum=1, **{BOUND_MARKER: OUTPUT_LENGTH_BOUND}))]
# /v1/completions takes 0: with echo it scores the prompt and generates nothing (OpenAI's form).
CompletionLength = Annotated[int, _INTEGRAL, WithJsonSchema(
    _integer(minimum=0, **{BOUND_MARKER: OUTPUT_LENGTH_BOUND}))]
NumLogprobs = Annotated[int, _INTEGRAL, WithJsonSchema(
    _integer(minimum=0, maximum=MAX_LOGPROBS))]
TokenId = Annotated[int, _INTEGRAL, WithJsonSchema(_TOKEN_ID)]
Seed = Annotated[int, _INTEGRAL]
# Insertion needs a fill-in-the-middle model: only an empty suffix (or null) is taken.
Suffix = Annotated[str, WithJsonSchema({"type": "string", "maxLength": 0})]

# JSON object keys are strings; the server takes ASCII digits only ("50256"), as OpenAI documents.
LogitBias = Annotated[dict[str, float], WithJsonSchema({
    "type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": _number(minimum=-MAX_LOGIT_BIAS, maximum=MAX_LOGIT_BIAS)})]

# Union fields are validated by hand in protocol.py (clearer messages than pydantic's unions).
Stop = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}},
    {"type": "null"}]})]
Prompt = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]})]
MessageContent = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {
        "type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        "required": ["type", "text"], "additionalProperties": False}},
    {"type": "null"}]})]


def _absent_or_null(name: str) -> dict[str, Any]:
    return {"properties": {name: {"type": "null"}}}  # holds when the field is missing, too


def _is_true(name: str) -> dict[str, Any]:
    return {"properties": {name: {"const": True}}, "required": [name]}


def only_with(field: str, needed: str) -> dict[str, Any]:
    """Schema rule: ``field`` may be set (non-null) only when ``needed`` is true."""
    return {"anyOf": [_absent_or_null(field), _is_true(needed)]}


def exactly_one(first: str, second: str) -> dict[str, Any]:
    """Schema rule: exactly one of the two fields is given (null counts as not given)."""
    def given(name: str, other: str) -> dict[str, Any]:
        return {"required": [name], "properties": {name: {"not": {"type": "null"}},
                                                   other: {"type": "null"}}}

    return {"anyOf": [given(first, second), given(second, first)]}


def cross_field_rules(*rules: dict[str, Any]) -> dict[str, Any]:
    """``json_schema_extra`` of a model: the checks its validators make across fields, so the
    published schema refuses what the server refuses (``allOf`` keeps them independent)."""
    return {"allOf": list(rules)}
