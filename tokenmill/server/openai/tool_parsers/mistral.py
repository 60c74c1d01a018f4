"""Mistral format: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

Mistral's v3 tokenizers (Mistral 7B v0.3, Mixtral 8x22B, Nemo) write a JSON list after the
``[TOOL_CALLS]`` special token; v11+ tokenizers write ``[TOOL_CALLS]name[ARGS]{...}`` per call. Both
are read. ``[TOOL_CALLS]`` is a special token, so this parser keeps special tokens in the output.
Text before the marker is content.
"""

from __future__ import annotations

import json

from tokenmill.server.openai.tool_parsers.base import (
    ParsedOutput,
    ParsedToolCall,
    ToolParser,
    call_from_json,
    json_values,
    none_if_blank,
)

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = (MARKER,)
    keeps_special_tokens = True

    def parse(self, text: str) -> ParsedOutput | None:
        start = text.find(MARKER)
        if start < 0:
            return None
        content = none_if_blank(text[:start])
        rest = text[start + len(MARKER):].strip()
        if rest.startswith("["):
            values = json_values(rest)
            if not values or not all(isinstance(v, list) for v in values):
                return None
            items = [item for value in values for item in value]
            calls = [call_from_json(item) for item in items]
        else:
            calls = [self._named_call(part) for part in rest.split(MARKER)]
        if not calls or any(c is None for c in calls):
            return None
        return ParsedOutput(content, [c for c in calls if c is not None])

    @staticmethod
    def _named_call(part: str) -> ParsedToolCall | None:
        name, found, arguments = part.partition(ARGS)
        if not found:
            return None
        return call_from_json({"name": name.strip(), "arguments": arguments.strip()})

    def instructions(self) -> str:
        return (f"To call functions, answer with {MARKER} followed by a JSON list of calls:\n"
                f'{MARKER}[{{"name": <function name>, "arguments": <arguments as a JSON '
                "object>}]\nOtherwise, answer normally.")

    def render_calls(self, calls: list[ParsedToolCall]) -> str:
        items = ", ".join(f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}'
                          for c in calls)
        return f"{MARKER}[{items}]"
