"""``/v1/responses`` through the official client's ``client.responses.create``: plain and with
instructions, streamed (typed events, numbered in order; the text equals the non-streamed text)
and not, a function tool round trip, ``text.format`` with a JSON schema, and 400s for what a
stateless server cannot do or does not know."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL
from tests.server.test_structured_output import _wait_idle

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "additionalProperties": False,
                          "properties": {"city": {"type": "string", "maxLength": 24}},
                          "required": ["city"]}}
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 40}


def _collect(stream) -> tuple[list, str, str]:
    events = list(stream)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    arguments = "".join(e.delta for e in events
                        if e.type == "response.function_call_arguments.delta")
    return events, text, arguments


def test_text_input_with_instructions(client):
    response = client.responses.create(input="Say hello in French.",
                                       instructions="Answer in one short sentence.", **GREEDY)
    assert response.object == "response" and response.id.startswith("resp")
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage.output_tokens >= 1 and response.usage.input_tokens > 10
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant"


def test_streamed_text_equals_the_non_streamed_text(client):
    kwargs = {"input": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": [{"type": "input_text",
                                                      "text": "Name a colour."}]}], **GREEDY}
    whole = client.responses.create(**kwargs)
    events, text, _ = _collect(client.responses.create(stream=True, **kwargs))
    assert text == whole.output_text
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == text


def test_function_tool_round_trip(client):
    question = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = client.responses.create(input=question, tools=[WEATHER], tool_choice="required",
                                    **GREEDY)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    events, _, arguments = _collect(client.responses.create(
        input=question, tools=[WEATHER], tool_choice="required", stream=True, **GREEDY))
    assert arguments == call.arguments
    assert "response.function_call_arguments.done" in [e.type for e in events]
    follow_up = client.responses.create(
        input=[*question, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "12 degrees and raining"}],
        tools=[WEATHER], tool_choice="none", **GREEDY)
    assert "12" in follow_up.output_text


def test_json_schema_text_format(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["colour"],
              "properties": {"colour": {"enum": ["red", "green", "blue"]}}}
    response = client.responses.create(
        input="Pick a colour.", text={"format": {"type": "json_schema", "name": "pick",
                                                  "schema": schema, "strict": True}}, **GREEDY)
    jsonschema.validate(json.loads(response.output_text), schema)


BAD = [
    ({"previous_response_id": "resp_123"}, "previous_response_id", "stateless"),
    ({"conversation": "conv_1"}, "conversation", "stateless"),
    ({"background": True}, "background", "not stored"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0].type",
     "not supported"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
     "input[0].call_id", "no earlier function_call"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content", "input_text"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", ""),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}},
     "tool_choice.name", "not in tools"),
    ({"max_output_tokens": 10**7}, "max_output_tokens", "max_output_tokens"),
    ({"input": [{"type": {}}]}, "input[0].type", "not supported"),  # was a 500 (fuzzer)
]


@pytest.mark.parametrize(("changes", "param", "text"), BAD, ids=[p for _, p, _ in BAD])
def test_what_it_cannot_do_is_a_400_naming_the_field(tokenmill_server, changes, param, text):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **changes}
    response = httpx.post(tokenmill_server.url + "/v1/responses", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert text in error["message"], error


def test_the_client_sees_a_bad_request_and_the_engine_holds_nothing(tokenmill_server, client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(input="Hi", previous_response_id="resp_1", **GREEDY)
    _wait_idle(tokenmill_server.url)
