"""Extractors: output text in, content and tool-call pieces out; fed token by token they give the
same message as fed the whole text at once (what makes streamed and non-streamed answers agree)."""

from __future__ import annotations

import json

import pytest

from tokenmill.server.openai.tool_call_stream import (
    ArgumentsPiece,
    AutoExtractor,
    CallStart,
    ContentPiece,
    Extractor,
    NamedExtractor,
    PlainExtractor,
    RequiredExtractor,
    assemble,
)
from tokenmill.server.openai.tool_parsers import PARSERS


def _run(extractor: Extractor, chunks: list[str]):
    pieces = [p for chunk in chunks for p in extractor.feed(chunk)] + extractor.finish()
    message = assemble(pieces)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.tool_calls]
    return message.content, calls, pieces


def _chars(text: str) -> list[str]:
    return list(text)


REQUIRED_ONE = '{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "days": [1, 2]}}'
REQUIRED_MANY = ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                 '{"name": "add", "arguments": {"a": 1, "b": {"c": []}}}]')
HERMES = ('I will look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
          "</tool_call>")


@pytest.mark.parametrize(("make", "text", "content", "calls"), [
    (PlainExtractor, "Hello <tool_call>", "Hello <tool_call>", []),
    (lambda: NamedExtractor("add"), '{"a": 1, "b": 2}', None, [("add", '{"a": 1, "b": 2}')]),
    (RequiredExtractor, REQUIRED_ONE, None,
     [("get_weather", '{"city": "Pa\\"ris}", "days": [1, 2]}')]),
    (RequiredExtractor, REQUIRED_MANY, None,
     [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": {"c": []}}')]),
    (lambda: AutoExtractor(PARSERS["hermes"]()), HERMES, "I will look.\n",
     [("get_weather", '{"city": "Paris"}')]),
    (lambda: AutoExtractor(PARSERS["hermes"]()), "Just <b>text</b> and <tool_", 
     "Just <b>text</b> and <tool_", []),
    (lambda: AutoExtractor(PARSERS["hermes"]()), "<tool_call>{broken", "<tool_call>{broken", []),
])
def test_token_by_token_equals_all_at_once(make, text, content, calls):
    whole = _run(make(), [text])
    by_char = _run(make(), _chars(text))
    assert whole[:2] == by_char[:2] == (content, calls)
    for _, arguments in calls:
        json.loads(arguments)


def test_a_call_is_announced_before_its_arguments_arrive():
    extractor = RequiredExtractor()
    pieces = extractor.feed('{"name": "get_weather", "arguments": ')
    assert [type(p) for p in pieces] == [CallStart]
    assert pieces[0].name == "get_weather" and pieces[0].id.startswith("call_")
    assert extractor.feed('{"city"') == [ArgumentsPiece(0, '{"city"')]


def test_auto_streams_prose_until_a_call_may_begin():
    extractor = AutoExtractor(PARSERS["hermes"]())
    assert extractor.feed("It is ") == [ContentPiece("It is ")]
    assert extractor.feed("sunny <tool") == [ContentPiece("sunny ")]  # "<tool" held
    assert extractor.feed("tip>") == [ContentPiece("<tooltip>")]  # not a marker after all
    assert extractor.feed("<tool_call>{") == []
    assert extractor.finish() == [ContentPiece("<tool_call>{")]  # malformed: plain content


def test_named_choice_with_no_output_still_names_the_call():
    content, calls, _ = _run(NamedExtractor("add"), [])
    assert (content, calls) == (None, [("add", "")])
