"""The ``auto`` tool-call parsers on hand-written model outputs: well-formed calls in each family's
format, and malformed ones, which must come back as plain content (never an exception)."""

from __future__ import annotations

import json

import pytest

from tokenmill.errors import ConfigError
from tokenmill.server.openai.tool_parsers import (
    PARSERS,
    ParsedToolCall,
    check_parser_name,
    make_parser,
)

WEATHER = ParsedToolCall("get_weather", '{"city": "Paris"}')
ADD = ParsedToolCall("add", '{"a": 1, "b": 2}')


def _calls(parser_name: str, text: str) -> tuple[str | None, list[ParsedToolCall]] | None:
    parsed = PARSERS[parser_name]().parse(text)
    return None if parsed is None else (parsed.content, parsed.calls)


@pytest.mark.parametrize(("parser", "text", "expected"), [
    ("hermes", ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               "</tool_call>"), (None, [WEATHER])),
    ("hermes", ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": '
               '"Paris"}}</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, '
               '"b": 2}}</tool_call>'), ("Let me check.", [WEATHER, ADD])),
    # arguments written as JSON text, and a last block left unclosed
    ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}',
     (None, [ADD])),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}',
     (None, [WEATHER])),
    ("llama3_json", ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "add", "arguments": {"a": 1, "b": 2}}'), (None, [WEATHER, ADD])),
    ("mistral", ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "add", "arguments": {"a": 1, "b": 2}}]'), (None, [WEATHER, ADD])),
    ("mistral", ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]'
                '{"a": 1, "b": 2}'), ("Sure.", [WEATHER, ADD])),
])
def test_well_formed_calls_parse(parser, text, expected):
    assert _calls(parser, text) == expected


@pytest.mark.parametrize(("parser", "text"), [
    ("hermes", "The weather in Paris is sunny."),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Par'),  # cut off
    ("hermes", "<tool_call>not json</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>'),  # not an object
    ("hermes", '<tool_call>{"name": "f", "arguments": "{bad"}</tool_call>'),
    ("hermes", "<tool_call></tool_call>"),
    ("llama3_json", 'Here it is: {"name": "get_weather", "parameters": {}}'),  # not at start
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}} and more'),
    ("llama3_json", '{"temperature": 22}'),
    ("llama3_json", "{"),
    ("mistral", "[TOOL_CALLS]"),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}'),
    ("mistral", "[TOOL_CALLS]get_weather"),
    ("mistral", "no calls here"),
])
def test_malformed_output_is_plain_content(parser, text):
    assert _calls(parser, text) is None


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_each_parser_reads_back_what_it_renders(parser):
    instance = PARSERS[parser]()
    parsed = instance.parse(instance.render_calls([WEATHER, ADD]))
    assert parsed is not None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert instance.instructions()


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ '<tool_call>' }}{% for t in tools %}{% endfor %}", "hermes"),
    ("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]", "mistral"),
    ("<|start_header_id|>ipython<|end_header_id|>{{ tools }}", "llama3_json"),
    ("{{ messages }}", "hermes"),  # the built-in model: no tool format, the fallback's
    (None, "hermes"),
])
def test_auto_picks_the_parser_by_the_template(template, expected):
    assert make_parser("auto", template).name == expected
    assert make_parser("mistral", template).name == "mistral"


def test_unknown_parser_name_is_a_config_error_naming_the_flag():
    with pytest.raises(ConfigError, match="tool-call-parser") as caught:
        check_parser_name("qwen-xml")
    assert caught.value.param == "tool_call_parser"


@pytest.mark.parametrize(("parser", "text", "start"), [
    ("hermes", "Sure <tool_call>{", 5),
    ("hermes", "Sure <tool_", 5),  # a marker cut off at the end is held back
    ("hermes", "Sure <b>", None),
    ("llama3_json", '  {"name"', 2),
    ("llama3_json", "Text {", None),
    ("mistral", "ok [TOOL", 3),
])
def test_call_start_finds_where_a_call_may_begin(parser, text, start):
    assert PARSERS[parser]().call_start(text) == start
