"""Tool calls through the real server and the official ``openai`` client: ``required`` and named
choices give arguments valid against each tool's schema (five varied tools); streamed tool-call
deltas reassemble to the non-streamed call; a follow-up turn with the tool's result is answered;
bad tool input is a 400 naming the field, with nothing left in the engine.

Everything is greedy, so runs repeat. Strings in the schemas are bounded (``maxLength``): a small
model may otherwise write one string until ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL
from tests.server.test_structured_output import _wait_idle, run_with_client

MAX_TOKENS = 100


def _tool(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}


def _text(max_length: int = 24) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


TOOLS = [
    _tool("get_weather", "The current weather in a city.", {
        "type": "object", "properties": {"city": _text(), "unit": {"enum": ["celsius",
                                                                            "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}),
    _tool("add", "Add two integers.", {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -1000,
                                               "maximum": 1000},
                                         "b": {"type": "integer", "minimum": -1000,
                                               "maximum": 1000}},
        "required": ["a", "b"], "additionalProperties": False}),
    _tool("create_event", "Put an event in the calendar.", {
        "type": "object", "properties": {
            "title": _text(30), "date": {"type": "string", "pattern": "^2026-[0-9]{2}-[0-9]{2}$"},
            "attendees": {"type": "array", "items": _text(16), "maxItems": 3},
            "all_day": {"type": "boolean"}},
        "required": ["title", "date", "attendees"], "additionalProperties": False}),
    _tool("set_thermostat", "Set the heating.", {
        "type": "object", "properties": {
            "temperature": {"type": "number", "minimum": 10, "maximum": 30},
            "mode": {"type": "string", "enum": ["heat", "cool", "off"]},
            "schedule": {"type": "object", "properties": {
                "start_hour": {"type": "integer", "minimum": 0, "maximum": 23},
                "end_hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                "required": ["start_hour", "end_hour"], "additionalProperties": False}},
        "required": ["temperature", "mode", "schedule"], "additionalProperties": False}),
    _tool("search_products", "Search the shop.", {
        "type": "object", "properties": {
            "query": _text(), "max_price": {"type": ["number", "null"], "minimum": 0},
            "category": {"anyOf": [{"const": "books"}, {"const": "music"}]}},
        "required": ["query", "max_price", "category"], "additionalProperties": False}),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = {
    "get_weather": "What is the weather like in Paris today?",
    "add": "What is 17 plus 25?",
    "create_event": "Book a team lunch with Ann and Bob on 2026-03-14.",
    "set_thermostat": "Keep the flat at 21 degrees from 7 in the morning to 10 at night.",
    "search_products": "Find me a cheap book about the sea.",
}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _calls(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


async def _create(client: openai.AsyncOpenAI, stream: bool, **kwargs: Any
                  ) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """(calls as (name, arguments), finish_reason, content) of one greedy request; a streamed
    one reassembled from its deltas the way a client does (by index)."""
    kwargs = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS, "tools": TOOLS,
              **kwargs}
    if not stream:
        response = await client.chat.completions.create(**kwargs)
        choice = response.choices[0]
        for call in choice.message.tool_calls or []:
            assert call.id.startswith("call_") and call.type == "function"
        return _calls(choice.message), choice.finish_reason, choice.message.content
    calls: dict[int, list[str]] = {}
    content, finish = "", None
    async for chunk in await client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:  # the first delta of a call: id, name, no arguments
                    assert delta.id.startswith("call_") and delta.function.name
                    assert delta.function.arguments == ""
                    calls[delta.index] = [delta.function.name, ""]
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index][1] += delta.function.arguments or ""
    return [(name, args) for name, args in calls.values()], finish, content or None


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


# (id, request changes): every tool by name, and "required" over all tools for every prompt
CASES = [(f"named-{name}", {"messages": _user(prompt), "tool_choice": _named(name)})
         for name, prompt in PROMPTS.items()]
CASES += [(f"required-{name}", {"messages": _user(prompt), "tool_choice": "required",
                                "parallel_tool_calls": False})
          for name, prompt in PROMPTS.items()]
CASES += [("required-parallel", {"messages": _user("What is the weather in Oslo and in Rome?"),
                                 "tool_choice": "required"})]
STREAMED = {"named-create_event", "required-set_thermostat", "required-parallel"}


@pytest.fixture(scope="module")
def results(tokenmill_server) -> dict[tuple[str, bool], Any]:
    """Every case non-streamed, and some streamed too, sent together (they batch)."""
    async def work(client: openai.AsyncOpenAI):
        keys = [(case_id, False) for case_id, _ in CASES]
        keys += [(case_id, True) for case_id, _ in CASES if case_id in STREAMED]
        changes = dict(CASES)
        answers = await asyncio.gather(*(_create(client, stream, **changes[case_id])
                                         for case_id, stream in keys))
        return dict(zip(keys, answers, strict=True))

    return run_with_client(tokenmill_server.url, work)


@pytest.mark.parametrize("case_id", [case_id for case_id, _ in CASES])
def test_required_and_named_choices_give_schema_valid_arguments(results, case_id):
    calls, finish, content = results[(case_id, False)]
    assert finish == "tool_calls"
    assert content is None
    assert calls
    if case_id.startswith("named-"):
        assert [name for name, _ in calls] == [case_id.removeprefix("named-")]
    if "parallel" not in case_id:
        assert len(calls) == 1
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("case_id", sorted(STREAMED))
def test_streamed_deltas_reassemble_to_the_non_streamed_call(results, case_id):
    assert results[(case_id, True)] == results[(case_id, False)]


def test_follow_up_turn_with_the_tool_result(client):
    conversation = _user(PROMPTS["get_weather"])
    first = client.chat.completions.create(
        model=MODEL, messages=conversation, tools=TOOLS, tool_choice=_named("get_weather"),
        temperature=0, max_tokens=MAX_TOKENS)
    message = first.choices[0].message
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    conversation += [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id,
                      "content": "22 degrees Celsius and sunny"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=conversation, tools=TOOLS, tool_choice="none", temperature=0,
        max_tokens=40)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert "22" in answer.choices[0].message.content
    assert answer.choices[0].message.tool_calls is None
    # "auto" with the same history: an answer or a call, each well-formed
    auto = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS,
                                          temperature=0, max_tokens=MAX_TOKENS)
    choice = auto.choices[0]
    assert choice.message.content or choice.message.tool_calls
    for name, arguments in _calls(choice.message):
        assert name in SCHEMAS
        json.loads(arguments)
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    # streamed, "auto" (the parser's held-back path) gives the same answer
    streamed = run_with_client(client.base_url.scheme + "://" + client.base_url.netloc.decode(),
                               lambda c: _create(c, True, messages=conversation))
    assert streamed == (_calls(choice.message), choice.finish_reason, choice.message.content)


CHAT_PATH = "/v1/chat/completions"
OK = {"model": MODEL, "messages": _user("Hi"), "max_tokens": 4}
_CALL = {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
_BAD_SCHEMA = _tool("f", "", {"type": "object", "properties": {"a": {"type": "strnig"}}})

# (body changes, param the 400 names, text in its message)
BAD_TOOL_INPUT = [
    ({"tools": TOOLS, "tool_choice": _named("get_time")}, "tool_choice.function.name",
     "not in tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": _named("add")}, "tool_choice", "no tools"),
    ({"tools": [_BAD_SCHEMA]}, "tools[0].function.parameters", "Invalid type: strnig"),
    ({"tools": [TOOLS[0], _tool("g", "", {"type": "string"})]},
     "tools[1].function.parameters", 'of type "object"'),
    ({"tools": [_tool("f", "", {"type": "object", "uniqueItems": True})],
      "tool_choice": "required"}, "tools[0].function.parameters", "unsupported JSON Schema"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "more than once"),
    ({"tools": [_tool("get weather", "", {})]}, "tools[0].function.name", "pattern"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "drop the output constraint"),
    ({"messages": [*_user("Hi"), {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages[1].tool_call_id", "no earlier assistant message"),
    ({"messages": [*_user("Hi"), {"role": "assistant", "tool_calls": [_CALL]},
                   {"role": "tool", "content": "x"}]}, "messages[2].tool_call_id", "required"),
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": [_CALL]}]},
     "messages[0].tool_calls", "only allowed on assistant"),
]


@pytest.mark.parametrize(("changes", "param", "text"), BAD_TOOL_INPUT,
                         ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(BAD_TOOL_INPUT)])
def test_bad_tool_input_is_a_400_naming_the_field(tokenmill_server, changes, param, text):
    response = httpx.post(tokenmill_server.url + CHAT_PATH, json={**OK, **changes}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert text in error["message"], error


def test_after_bad_tool_input_the_server_serves_and_holds_no_kv(tokenmill_server, client):
    for changes, _, _ in BAD_TOOL_INPUT:
        assert httpx.post(tokenmill_server.url + CHAT_PATH, json={**OK, **changes},
                          timeout=60).status_code == 400
    _wait_idle(tokenmill_server.url)
    response = client.chat.completions.create(
        model=MODEL, messages=_user(PROMPTS["add"]), tools=TOOLS, tool_choice=_named("add"),
        temperature=0, max_tokens=MAX_TOKENS)
    jsonschema.validate(json.loads(response.choices[0].message.tool_calls[0].function.arguments),
                        SCHEMAS["add"])
    _wait_idle(tokenmill_server.url)
    assert "Traceback" not in tokenmill_server.log()
