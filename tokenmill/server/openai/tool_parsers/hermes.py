"""Hermes / Qwen format: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

The format NousResearch's Hermes models and Qwen 2/2.5/3 are trained on, and the one the fallback
system prompt asks for (the built-in model has no tool template). A last block the model left
unclosed (it stopped right after the JSON) still counts when its JSON is whole.
"""

from __future__ import annotations

import json
import re

from tokenmill.server.openai.tool_parsers.base import (
    ParsedOutput,
    ParsedToolCall,
    ToolParser,
    call_from_json,
    json_values,
    none_if_blank,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.DOTALL)


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = (OPEN,)

    def parse(self, text: str) -> ParsedOutput | None:
        if OPEN not in text:
            return None
        calls: list[ParsedToolCall] = []
        outside: list[str] = []
        position = 0
        for block in _BLOCK.finditer(text):
            outside.append(text[position:block.start()])
            position = block.end()
            values = json_values(block.group(1))
            if not values:
                return None
            for value in values:
                call = call_from_json(value)
                if call is None:
                    return None
                calls.append(call)
        outside.append(text[position:])
        return ParsedOutput(none_if_blank("".join(outside)), calls)

    def instructions(self) -> str:
        return ("To call a function, answer with one block per call, each on its own line:\n"
                f'{OPEN}{{"name": <function name>, "arguments": <arguments as a JSON object>}}'
                f"{CLOSE}\nOtherwise, answer normally.")

    def render_calls(self, calls: list[ParsedToolCall]) -> str:
        return "\n".join(f'{OPEN}{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}'
                         f"{CLOSE}" for c in calls)
