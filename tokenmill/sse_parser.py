"""Reading server-sent events: the one parser every client side of tokenmill uses.

The gateway (reading its replicas' streams), ``tokenmill bench`` and the soak test all read
OpenAI-style streams; they share this parser so they agree on what a stream says. It follows the
WHATWG event-stream rules: lines end in CRLF, LF or CR (a CR at the end of one read may be the
first half of a CRLF in the next), ``:`` starts a comment, a line is ``field: value`` (one space
after the colon dropped), several ``data:`` lines of one event are joined with ``\\n``, a blank
line dispatches the event, an event with no data is dropped, unknown fields are ignored, and a
leading byte-order mark is skipped. Bytes are decoded as UTF-8 incrementally, so a character
split across reads is kept whole. (``httpx-sse`` does the same; a local parser keeps one less
dependency and lets the bench count lines that are not SSE at all.)

The writing side is ``tokenmill/server/sse.py``.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx

_LINE_END = re.compile(r"\r\n|\r|\n")
_KNOWN_FIELDS = ("data", "event", "id", "retry")
_MAX_UNKNOWN_KEPT = 5


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str = ""
    """The last event id seen so far in the stream (SSE ids carry over to later events)."""
    retry: int | None = None


class SSEParser:
    """Incremental: ``feed`` it text in pieces of any size; it returns the events completed."""

    def __init__(self) -> None:
        self._buffer = ""
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None
        self.unknown_lines: list[str] = []
        """The first few lines that were neither a known field nor a comment (kept for
        diagnostics; the SSE rules ignore them)."""

    def feed(self, text: str) -> list[ServerSentEvent]:
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        buf = self._buffer + text
        events: list[ServerSentEvent] = []
        start = 0
        while (match := _LINE_END.search(buf, start)) is not None:
            if match.group() == "\r" and match.end() == len(buf):
                break  # maybe the first half of a CRLF split across reads
            event = self._line(buf[start:match.start()])
            start = match.end()
            if event is not None:
                events.append(event)
        self._buffer = buf[start:]
        return events

    def close(self) -> tuple[list[ServerSentEvent], ServerSentEvent | None]:
        """End of stream: (events a trailing CR completed, the event whose closing blank line
        never came or None). The SSE rules discard the latter; a caller may still look at it."""
        events = self.feed("\n") if self._buffer else []  # a last line without its line end
        if not self._data:
            return events, None
        event = ServerSentEvent("\n".join(self._data), self._event or "message",
                                self._last_id, self._retry)
        self._data, self._event = [], ""
        return events, event

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        elif len(self.unknown_lines) < _MAX_UNKNOWN_KEPT:
            self.unknown_lines.append(line)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent("\n".join(data), event or "message", self._last_id, self._retry)


async def aiter_sse(response: httpx.Response, parser: SSEParser | None = None,
                    *, keep_unterminated: bool = False) -> AsyncIterator[ServerSentEvent]:
    """The events of a streamed ``httpx`` response, as they arrive. ``keep_unterminated``: also
    yield a last event that lacks its closing blank line."""
    parser = parser or SSEParser()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async for chunk in response.aiter_bytes():
        for event in parser.feed(decoder.decode(chunk)):
            yield event
    for event in _finish(parser, decoder, keep_unterminated):
        yield event


def iter_sse(response: httpx.Response, parser: SSEParser | None = None,
             *, keep_unterminated: bool = False) -> Iterator[ServerSentEvent]:
    """``aiter_sse`` for a synchronous ``httpx`` response (``httpx.stream(...)``)."""
    parser = parser or SSEParser()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in response.iter_bytes():
        yield from parser.feed(decoder.decode(chunk))
    yield from _finish(parser, decoder, keep_unterminated)


def _finish(parser: SSEParser, decoder: codecs.IncrementalDecoder, keep_unterminated: bool
            ) -> list[ServerSentEvent]:
    events = parser.feed(decoder.decode(b"", final=True))
    closed, last = parser.close()
    events += closed
    if last is not None and keep_unterminated:
        events.append(last)
    return events
