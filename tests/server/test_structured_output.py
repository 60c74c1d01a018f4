"""Structured output through the real server and the official ``openai`` client: JSON schemas
(20 shapes, streamed and not), json_object, regex, choice and grammar outputs, ``parse`` with a
Pydantic model, a constrained request batched with a free one, and bad constraints refused with
400s that name the field, with nothing left behind in the engine.

Everything is greedy, so runs repeat. The built-in model is small: a schema may not complete within
``max_tokens``; every output that ends with "stop" must validate, and most must end that way.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import MODEL, metric, scrape

MAX_TOKENS = 120
NAME = {"type": "string", "maxLength": 24}

# (what to ask for, schema): nested objects, arrays, enums, bounded numbers, required and optional
# fields, patterns, nullable and union types, $ref, a top-level array.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", {"type": "object", "properties": {
        "name": NAME, "age": {"type": "integer"}, "active": {"type": "boolean"}},
        "required": ["name", "age", "active"], "additionalProperties": False}),
    ("a user with an address", {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "address": {"type": "object", "properties": {"city": NAME, "zip": {
                "type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["id", "address"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False}),
    ("tags for a blog post", {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 5}},
        "required": ["tags"], "additionalProperties": False}),
    ("three points on a line", {"type": "object", "properties": {
        "points": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"], "additionalProperties": False}}},
        "required": ["points"], "additionalProperties": False}),
    ("a T-shirt", {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
        "required": ["color", "size"], "additionalProperties": False}),
    ("an exam result", {"type": "object", "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["score", "ratio"], "additionalProperties": False}),
    ("a flight code", {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
        "required": ["code"], "additionalProperties": False}),
    ("a report title", {"type": "object", "properties": {
        "title": {"type": "string", "minLength": 3, "maxLength": 20}},
        "required": ["title"], "additionalProperties": False}),
    ("a film, year optional", {"type": "object", "properties": {
        "title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "subtitle": NAME}, "required": ["title"], "additionalProperties": False}),
    ("feature flags", {"type": "object", "properties": {
        "dark_mode": {"type": "boolean"}, "beta": {"type": "boolean"},
        "notifications": {"type": "boolean"}},
        "required": ["dark_mode", "beta", "notifications"], "additionalProperties": False}),
    ("a contact whose email may be null", {"type": "object", "properties": {
        "name": NAME, "email": {"type": ["string", "null"], "maxLength": 30}},
        "required": ["name", "email"], "additionalProperties": False}),
    ("an id that is a number or a string", {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}},
        "required": ["id"], "additionalProperties": False}),
    ("a versioned config", {"type": "object", "properties": {
        "version": {"const": 2}, "name": NAME},
        "required": ["version", "name"], "additionalProperties": False}),
    ("a 2x2 matrix", {"type": "object", "properties": {
        "rows": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer"}}}},
        "required": ["rows"], "additionalProperties": False}),
    ("a product", {"type": "object", "properties": {
        "name": NAME, "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000},
        "currency": {"enum": ["USD", "EUR", "GBP"]}, "in_stock": {"type": "boolean"}},
        "required": ["name", "price", "currency", "in_stock"], "additionalProperties": False}),
    ("a meeting", {"type": "object", "properties": {
        "title": NAME, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "attendees": {"type": "array", "items": NAME, "maxItems": 4}},
        "required": ["title", "date", "attendees"], "additionalProperties": False}),
    ("a book and its author", {"type": "object", "properties": {
        "title": NAME, "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "author": {"type": "object", "properties": {"first": NAME, "last": NAME},
                   "required": ["first", "last"], "additionalProperties": False}},
        "required": ["title", "year", "author"], "additionalProperties": False}),
    ("a line segment", {"$defs": {"point": {
        "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"},
                                          "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False}),
    ("a recipe", {"type": "object", "properties": {
        "dish": NAME,
        "ingredients": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"item": NAME,
                                             "grams": {"type": "integer", "minimum": 0}},
            "required": ["item", "grams"], "additionalProperties": False}}},
        "required": ["dish", "ingredients"], "additionalProperties": False}),
    ("a list of prime numbers", {"type": "array", "items": {"type": "integer", "minimum": 2},
                                 "minItems": 2, "maxItems": 5}),
]


def messages(what: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Give me {what} as JSON."}]


def json_schema_format(index: int, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema",
            "json_schema": {"name": f"schema_{index}", "schema": schema, "strict": True}}


def run_with_client(url: str, work: Callable[[openai.AsyncOpenAI], Awaitable[Any]]) -> Any:
    """``work(client)`` in a fresh event loop with a client of its own: a client's pooled
    connections belong to the loop that opened them (the session's ``async_client`` is kept
    for the one ``asyncio.run`` of the tests that use it)."""
    async def run() -> Any:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await work(client)

    return asyncio.run(run())


async def _chat(async_client: openai.AsyncOpenAI, stream: bool, **kwargs: Any
                ) -> tuple[str, str | None]:
    """(text, finish_reason) of one greedy chat completion, streamed or not."""
    kwargs = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, **kwargs}
    if not stream:
        response = await async_client.chat.completions.create(**kwargs)
        return response.choices[0].message.content, response.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await async_client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.fixture(scope="module")
def schema_results(tokenmill_server) -> dict[bool, list[tuple[str, str | None]]]:
    """Every schema, streamed and not, all sent at once (they batch in the engine)."""
    async def run_all(async_client: openai.AsyncOpenAI) -> list[tuple[str, str | None]]:
        calls = [_chat(async_client, stream, messages=messages(what),
                       response_format=json_schema_format(i, schema))
                 for stream in (False, True) for i, (what, schema) in enumerate(SCHEMAS)]
        return await asyncio.gather(*calls)

    results = run_with_client(tokenmill_server.url, run_all)
    return {False: results[:len(SCHEMAS)], True: results[len(SCHEMAS):]}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_outputs_validate(schema_results, stream):
    results = schema_results[stream]
    finished = 0
    for (what, schema), (text, finish) in zip(SCHEMAS, results):
        assert finish in ("stop", "length"), (what, finish)
        if finish == "stop":
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished >= 16, f"only {finished} of {len(SCHEMAS)} outputs completed: {results}"


def test_json_object_gives_a_json_object(client):
    response = client.chat.completions.create(
        model=MODEL, messages=messages("a cat"), temperature=0, max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"})
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_text_response_format_changes_nothing(client):
    kwargs = {"model": MODEL, "messages": messages("a cat"), "temperature": 0, "max_tokens": 12}
    plain = client.chat.completions.create(**kwargs)
    text = client.chat.completions.create(response_format={"type": "text"}, **kwargs)
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_regex_choice_and_grammar_outputs_match(client):
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    ask = [{"role": "user", "content": "When did the first person walk on the moon?"}]
    by_field = client.chat.completions.create(
        model=MODEL, messages=ask, temperature=0, max_tokens=20,
        extra_body={"structured_outputs": {"regex": date}})
    assert re.fullmatch(date, by_field.choices[0].message.content)
    old_name = client.completions.create(model=MODEL, prompt="The moon landing was on", max_tokens=20,
                                         temperature=0, extra_body={"guided_regex": date})
    assert re.fullmatch(date, old_name.choices[0].text)

    choices = ["positive", "negative", "neutral"]
    sentiment = [{"role": "user", "content": "Sentiment of 'I love this phone!'?"}]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        response = client.chat.completions.create(model=MODEL, messages=sentiment, max_tokens=8,
                                                  temperature=0, extra_body=extra)
        assert response.choices[0].message.content in choices
        assert response.choices[0].finish_reason == "stop"

    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 6 times 7?"}], max_tokens=16,
        temperature=0, extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"The answer is [0-9]{1,3}\.", response.choices[0].message.content)


def test_completions_take_a_schema_too(client):
    schema = SCHEMAS[0][1]
    for extra in ({"guided_json": schema},
                  {"response_format": json_schema_format(0, schema)},
                  {"structured_outputs": {"json": json.dumps(schema)}}):
        response = client.completions.create(model=MODEL, prompt="A person as JSON:",
                                             max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body=extra)
        assert response.choices[0].finish_reason == "stop", extra
        jsonschema.validate(json.loads(response.choices[0].text), schema)


def test_length_limit_before_the_schema_completes_is_length(client):
    response = client.chat.completions.create(
        model=MODEL, messages=messages("a person"), temperature=0, max_tokens=3,
        response_format=json_schema_format(0, SCHEMAS[0][1]))
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int
    city: str = Field(max_length=24)


def test_client_parse_returns_a_pydantic_object(client):
    completion = client.chat.completions.parse(
        model=MODEL, messages=messages("a person with a name, an age and a city"),
        response_format=Person, temperature=0, max_tokens=MAX_TOKENS)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person), completion
    assert parsed.name and parsed.city


def test_constrained_and_free_requests_together_give_what_they_give_alone(tokenmill_server):
    constrained = {"messages": messages("a T-shirt"),
                   "response_format": json_schema_format(4, SCHEMAS[4][1])}
    free = {"messages": [{"role": "user", "content": "Name three colours."}]}

    async def alone_then_together(async_client: openai.AsyncOpenAI):
        alone = [await _chat(async_client, False, **constrained),
                 await _chat(async_client, False, **free)]
        together = await asyncio.gather(_chat(async_client, False, **constrained),
                                        _chat(async_client, True, **free))
        return alone, list(together)

    alone, together = run_with_client(tokenmill_server.url, alone_then_together)
    assert together == alone
    jsonschema.validate(json.loads(alone[0][0]), SCHEMAS[4][1])


CHAT_PATH = "/v1/chat/completions"
OK = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

# (body changes, param the 400 names, text in its message)
BAD_CONSTRAINTS = [
    ({"response_format": json_schema_format(0, {"type": "strnig"})},
     "response_format.json_schema.schema", "Invalid type: strnig"),
    ({"response_format": json_schema_format(0, {"type": "object", "required": "name"})},
     "response_format.json_schema.schema", "Expected array for 'required'"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json",
     "unsupported JSON Schema keywords"),
    ({"structured_outputs": {"json": {"type": "object", "not": {"required": ["a"]}}}},
     "structured_outputs.json", "unsupported JSON Schema keywords"),
    ({"guided_json": {"type": "integer", "minimum": 10, "maximum": 1}}, "guided_json",
     "minimum (10) is greater than maximum (1)"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar",
     "unknown name"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "response_format",
     "response_format, guided_regex"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs.regex",
     "structured_outputs.regex, structured_outputs.choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "required"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"response_format": {"type": "text", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.json_schema", "only allowed"),
    ({"guided_choice": []}, "guided_choice", "at least 1"),
]


def _idle(url: str) -> bool:
    samples = scrape(url)
    return all(metric(samples, name) == 0.0 for name in (
        "tokenmill:kv_cache_usage_perc", "tokenmill:num_requests_running",
        "tokenmill:num_requests_waiting"))


def _wait_idle(url: str) -> None:
    deadline = time.monotonic() + 30
    while not _idle(url):
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


@pytest.mark.parametrize(("changes", "param", "text"), BAD_CONSTRAINTS,
                         ids=[p for _, p, _ in BAD_CONSTRAINTS])
def test_bad_constraints_are_400s_naming_the_field(tokenmill_server, changes, param, text):
    response = httpx.post(tokenmill_server.url + CHAT_PATH, json={**OK, **changes}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert text in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_after_bad_constraints_the_server_serves_and_holds_no_kv(tokenmill_server, client):
    for changes, _, _ in BAD_CONSTRAINTS:  # again, now from the cache of failed compiles
        assert httpx.post(tokenmill_server.url + CHAT_PATH, json={**OK, **changes},
                          timeout=60).status_code == 400
    _wait_idle(tokenmill_server.url)
    response = client.chat.completions.create(
        model=MODEL, messages=messages("a T-shirt"), temperature=0, max_tokens=MAX_TOKENS,
        response_format=json_schema_format(4, SCHEMAS[4][1]))
    jsonschema.validate(json.loads(response.choices[0].message.content), SCHEMAS[4][1])
    _wait_idle(tokenmill_server.url)
    assert httpx.get(tokenmill_server.url + "/health").status_code == 200
    assert "Traceback" not in tokenmill_server.log()
