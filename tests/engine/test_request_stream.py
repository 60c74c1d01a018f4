"""RequestStream without a model: a reader that falls behind gets one coalesced output (deltas
concatenated, nothing lost), and past ``max_unread_tokens`` its request is given up with a clear
error instead of buffering without bound."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.request_stream import RequestStream
from tokenmill.errors import SlowReaderError


def _step(token_id: int, text: str, finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(index=0, delta_text=text, delta_token_ids=[token_id],
                                  finish_reason="length" if finished else None)
    return RequestOutput("r", None, [1, 2], [completion], finished=finished)


def _stream(max_unread_tokens: int = 1000) -> tuple[RequestStream, list[str]]:
    aborted: list[str] = []

    async def abort(request_id: str) -> None:
        aborted.append(request_id)

    return RequestStream("r", 2, max_unread_tokens, abort), aborted


def test_unread_outputs_coalesce_into_one() -> None:
    async def main() -> None:
        stream, _ = _stream()
        for i in range(50):
            assert stream.put(_step(i, f"<{i}>"))
        assert stream.num_unread_tokens == 50 and stream.num_coalesced == 49
        output = await anext(stream)
        assert output.outputs[0].delta_token_ids == list(range(50))
        assert output.outputs[0].delta_text == "".join(f"<{i}>" for i in range(50))
        assert stream.num_unread_tokens == 0
        final = _step(50, "!", finished=True)
        final.outputs[0].text, final.outputs[0].token_ids = "whole", list(range(51))
        stream.put(_step(49, "x"))
        stream.put(final)
        last = await anext(stream)
        assert last.finished and last.outputs[0].delta_token_ids == [49, 50]
        assert last.outputs[0].text == "whole" and last.outputs[0].token_ids == list(range(51))
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

    asyncio.run(main())


def test_a_reader_past_the_limit_gets_an_error_naming_it() -> None:
    async def main() -> None:
        stream, _ = _stream(max_unread_tokens=8)
        results = [stream.put(_step(i, "a")) for i in range(9)]
        assert results == [True] * 8 + [False]  # the caller aborts the request in the core
        with pytest.raises(SlowReaderError, match="max_unread_tokens=8"):
            await anext(stream)
        assert stream.put(_step(99, "late"))  # outputs after the error are dropped quietly
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

    asyncio.run(main())


def test_closing_an_unfinished_stream_aborts_its_request_once() -> None:
    async def main() -> None:
        stream, aborted = _stream()
        stream.put(_step(0, "a"))
        await stream.aclose()
        await stream.aclose()
        assert aborted == ["r"]
        finished, aborted_finished = _stream()
        finished.put(_step(0, "a", finished=True))
        await finished.aclose()  # finished in the core already: nothing to abort
        assert aborted_finished == []

    asyncio.run(main())
