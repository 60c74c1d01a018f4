"""Model output text in, content and tool-call pieces out, as the text arrives.

One extractor per choice. ``feed`` takes each new piece of text and returns what can be said
already; ``finish`` returns the rest once the output has ended. Streamed and non-streamed answers
both come from these pieces (a non-streamed answer feeds the whole text at once), so the two
agree by construction.

* ``PlainExtractor``: no tools; everything is content.
* ``NamedExtractor``: ``tool_choice`` names a function; the grammar makes the output exactly its
  arguments, so every piece of text is an arguments fragment of call 0.
* ``RequiredExtractor``: ``tool_choice: "required"``; the grammar makes the output
  ``{"name": "...", "arguments": {...}}`` (a JSON list of them with parallel calls), written
  compactly with ``", "`` and ``": "`` and the name first, so a small scanner can announce the
  name as soon as it is complete and pass the arguments on as they come.
* ``AutoExtractor``: free output read by a per-family parser; text streams as content until
  something may begin a call, then the rest is held and parsed when the output ends (a parser
  needs the whole call to tell a call from prose).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from tokenmill.server.openai.tool_parsers import ToolParser


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsPiece:
    index: int
    text: str


Piece = ContentPiece | CallStart | ArgumentsPiece


class Extractor:
    num_calls: int = 0

    def feed(self, text: str) -> list[Piece]:
        raise NotImplementedError

    def finish(self) -> list[Piece]:
        return []


class PlainExtractor(Extractor):
    def feed(self, text: str) -> list[Piece]:
        return [ContentPiece(text)] if text else []


class NamedExtractor(Extractor):
    def __init__(self, name: str):
        self.name = name

    def _start(self) -> list[Piece]:
        if self.num_calls:
            return []
        self.num_calls = 1
        return [CallStart(0, new_call_id(), self.name)]

    def feed(self, text: str) -> list[Piece]:
        if not text:
            return []
        return [*self._start(), ArgumentsPiece(0, text)]

    def finish(self) -> list[Piece]:
        return self._start()  # a call even when the output is empty (max_tokens reached first)


_HEAD = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
_MAX_HEAD_CHARS = 200  # names are at most 64 characters; more means the output is not a call


class RequiredExtractor(Extractor):
    def __init__(self) -> None:
        self.state = "seek"
        self.head = ""
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        fragment: list[str] = []
        for char in text:
            if self.state == "seek":  # between calls: "[", ", ", "]"
                if char == "{":
                    self.state, self.head = "head", char
            elif self.state == "head":
                self.head += char
                match = _HEAD.fullmatch(self.head)
                if match is not None:
                    pieces.append(CallStart(self.num_calls, new_call_id(),
                                            json.loads(f'"{match.group(1)}"')))
                    self.num_calls += 1
                    self.state, self.depth = "arguments", 0
                elif len(self.head) > _MAX_HEAD_CHARS:
                    self.state = "broken"
            elif self.state == "arguments":
                fragment.append(char)
                if self._closes_value(char):
                    pieces.append(ArgumentsPiece(self.num_calls - 1, "".join(fragment)))
                    fragment = []
                    self.state = "seek"  # the call's own "}" follows, then maybe ", {"
        if fragment:
            pieces.append(ArgumentsPiece(self.num_calls - 1, "".join(fragment)))
        return pieces

    def _closes_value(self, char: str) -> bool:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
            return False
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class AutoExtractor(Extractor):
    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.num_sent = 0
        """Characters of ``text`` already sent as content."""
        self.sent_words = False
        """Something other than whitespace went out: leading markers no longer count."""
        self.holding = False
        """A whole marker was seen: everything from it waits for ``finish`` (no more scans, so
        a long held output costs nothing per token)."""

    def feed(self, text: str) -> list[Piece]:
        self.text += text
        if self.holding:
            return []
        rest = self.text[self.num_sent:]  # short: at most a cut-off marker was held back
        start = self.parser.call_start(rest, at_start=not self.sent_words)
        if start is not None:
            markers = (*self.parser.markers, *self.parser.leading_markers)
            self.holding = any(rest.startswith(m, start) for m in markers)
        end = len(rest) if start is None else start
        if end == 0:
            return []
        piece = ContentPiece(rest[:end])
        self.num_sent += end
        self.sent_words = self.sent_words or bool(piece.text.strip())
        return [piece]

    def finish(self) -> list[Piece]:
        held = self.text[self.num_sent:]
        self.num_sent = len(self.text)
        if not held:
            return []
        parsed = self.parser.parse(held)
        if parsed is None or not parsed.calls:
            return [ContentPiece(held)]
        pieces: list[Piece] = [ContentPiece(parsed.content)] if parsed.content else []
        for index, call in enumerate(parsed.calls):
            pieces += [CallStart(index, new_call_id(), call.name),
                       ArgumentsPiece(index, call.arguments)]
        self.num_calls = len(parsed.calls)
        return pieces


@dataclass
class AssembledMessage:
    content: str | None
    tool_calls: list[dict]


def assemble(pieces: list[Piece]) -> AssembledMessage:
    """All pieces of one output as a message: content (None when only calls are there) and
    OpenAI ``tool_calls`` entries."""
    content = "".join(p.text for p in pieces if isinstance(p, ContentPiece))
    calls: list[dict] = []
    for piece in pieces:
        if isinstance(piece, CallStart):
            calls.append({"id": piece.id, "type": "function",
                          "function": {"name": piece.name, "arguments": ""}})
        elif isinstance(piece, ArgumentsPiece):
            calls[piece.index]["function"]["arguments"] += piece.text
    if calls and not content.strip():
        return AssembledMessage(None, calls)
    return AssembledMessage(content, calls)
