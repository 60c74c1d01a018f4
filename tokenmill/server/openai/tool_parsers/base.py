"""What every tool-call parser shares: the parsed call, the parser interface, and JSON helpers.

A parser reads a model's whole free output (``tool_choice: "auto"``) and splits it into plain
content and tool calls, in the format one model family was trained to write. It never raises on
what a model writes: output that does not hold a well-formed call is plain content (``parse``
returns None), so a confused model gives a text answer, not a 500.

For streaming it names the markers that may begin a call: the chat route streams text until one
(or the start of one) shows up, then holds the rest back and parses it when the output ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str
    """JSON text of the arguments object."""


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None
    """The text outside the calls (None when there is none)."""
    calls: list[ParsedToolCall]


class ToolParser:
    name: ClassVar[str] = ""
    markers: ClassVar[tuple[str, ...]] = ()
    """Text that begins a call anywhere in the output."""
    leading_markers: ClassVar[tuple[str, ...]] = ()
    """Text that begins a call only at the start of the output (after whitespace)."""
    keeps_special_tokens: ClassVar[bool] = False
    """The format's markers are special tokens, so the output must keep them to be parsed."""

    def parse(self, text: str) -> ParsedOutput | None:
        """Content and calls, or None when ``text`` holds no well-formed call."""
        raise NotImplementedError

    def instructions(self) -> str:
        """How the fallback system prompt asks for a call (for templates without tools)."""
        raise NotImplementedError

    def render_calls(self, calls: list[ParsedToolCall]) -> str:
        """Earlier calls as the model would have written them (fallback rendering)."""
        raise NotImplementedError

    def call_start(self, text: str, at_start: bool = True) -> int | None:
        """Where a call may begin in ``text`` (also a marker cut off at the end), else None.
        ``at_start``: ``text`` is the start of the output (leading markers count)."""
        stripped = len(text) - len(text.lstrip())
        for marker in self.leading_markers if at_start else ():
            rest = text[stripped:]
            if rest.startswith(marker) or (rest and marker.startswith(rest)):
                return stripped
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        if found:
            return min(found)
        # A marker cut off at the end ("<tool_" while "<tool_call>" is on its way) is held too.
        for marker in self.markers:
            for size in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:size]):
                    return len(text) - size
        return None


def call_from_json(value: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")
                   ) -> ParsedToolCall | None:
    """``{"name": ..., "arguments": {...}}`` (or its other spellings) as a call, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if not value["name"]:
        return None
    arguments: Any = {}
    for key in argument_keys:
        if key in value:
            arguments = value[key]
            break
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def json_values(text: str, separators: str = " \t\r\n") -> list[Any] | None:
    """Every JSON value in ``text``, one after another (``separators`` may stand between them),
    or None if anything else is there."""
    decoder = json.JSONDecoder()
    values = []
    position = 0
    while True:
        while position < len(text) and text[position] in separators:
            position += 1
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return None
        values.append(value)


def none_if_blank(text: str) -> str | None:
    return text.strip() or None
