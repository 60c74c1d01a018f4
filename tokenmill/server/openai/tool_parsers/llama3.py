"""Llama 3.1 / 3.2 JSON format: the whole answer is ``{"name": ..., "parameters": {...}}``.

Meta's template asks for a bare JSON object with ``parameters`` (some fine-tunes write
``arguments``); several calls are separated by ``;``. The optional ``<|python_tag|>`` prefix is a
special token, so this parser keeps special tokens in the output. A call only counts when the
answer *starts* with it and nothing but calls follows: a JSON object in the middle of prose is
prose.
"""

from __future__ import annotations

import json

from tokenmill.server.openai.tool_parsers.base import (
    ParsedOutput,
    ParsedToolCall,
    ToolParser,
    call_from_json,
    json_values,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    leading_markers = (PYTHON_TAG, "{")
    keeps_special_tokens = True

    def parse(self, text: str) -> ParsedOutput | None:
        body = text.strip()
        body = body.removeprefix(PYTHON_TAG)
        if not body.lstrip().startswith("{"):
            return None
        values = json_values(body, separators=" \t\r\n;")
        if not values:
            return None
        calls = [call_from_json(v, ("parameters", "arguments")) for v in values]
        if any(c is None for c in calls):
            return None
        return ParsedOutput(None, [c for c in calls if c is not None])

    def instructions(self) -> str:
        return ("To call a function, answer with nothing but one JSON object per call, "
                'separated by "; ":\n{"name": <function name>, "parameters": <arguments as a '
                "JSON object>}\nOtherwise, answer normally.")

    def render_calls(self, calls: list[ParsedToolCall]) -> str:
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}'
                         for c in calls)
