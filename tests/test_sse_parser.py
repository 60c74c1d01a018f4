"""The shared SSE parser (tokenmill/sse_parser.py) on the framings the event-stream rules allow."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tokenmill.sse_parser import ServerSentEvent, SSEParser, aiter_sse


def parse(*pieces: str) -> list[ServerSentEvent]:
    parser = SSEParser()
    events = [e for piece in pieces for e in parser.feed(piece)]
    return events + parser.close()[0]


def test_data_lines_join_with_newlines_and_one_leading_space_is_dropped():
    events = parse('data: {"a":\ndata:  1}\n\n')
    assert [e.data for e in events] == ['{"a":\n 1}']


def test_comments_event_id_and_retry_fields():
    events = parse(": keep-alive\n\nevent: delta\nid: 7\nretry: 1500\ndata: x\n\n"
                   "data: y\n\n")
    assert events == [ServerSentEvent("x", "delta", "7", 1500),
                      ServerSentEvent("y", "message", "7", 1500)]  # id and retry carry over


def test_unknown_fields_are_ignored_but_noted_and_empty_events_dropped():
    parser = SSEParser()
    events = parser.feed("bogus line\nevent: ping\n\ndata\n\n")
    assert [(e.event, e.data) for e in events] == [("message", "")]  # "data" alone: empty data
    assert parser.unknown_lines == ["bogus line"]


@pytest.mark.parametrize("newline", ["\r\n", "\r", "\n"])
def test_every_line_ending(newline):
    text = f"data: one{newline}data: two{newline}{newline}data: [DONE]{newline}{newline}"
    assert [e.data for e in parse(text)] == ["one\ntwo", "[DONE]"]


def test_an_event_split_across_reads_at_every_position():
    text = ': c\r\nevent: e\r\ndata: {"x": 1}\r\n\r\ndata: [DONE]\r\n\r\n'
    for cut in range(len(text) + 1):
        events = parse(text[:cut], text[cut:])
        assert [(e.event, e.data) for e in events] == [("e", '{"x": 1}'),
                                                        ("message", "[DONE]")], cut


def test_a_byte_order_mark_and_an_unterminated_last_event():
    parser = SSEParser()
    assert [e.data for e in parser.feed("\ufeffdata: a\n\ndata: [DONE]")] == ["a"]
    terminated, last = parser.close()
    assert terminated == [] and last is not None and last.data == "[DONE]"


def test_aiter_sse_over_httpx_keeps_utf8_split_across_chunks():
    payload = 'data: {"t": "héllo ✓"}\r\n\r\n: bye\n'.encode()

    async def body():
        for i in range(len(payload)):  # one byte per read: splits the multi-byte characters
            yield payload[i:i + 1]

    async def run() -> list[str]:
        response = httpx.Response(200, content=body())
        return [e.data async for e in aiter_sse(response)]

    assert asyncio.run(run()) == ['{"t": "héllo ✓"}']
