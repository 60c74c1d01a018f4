"""Server-sent events as OpenAI streams them, and watching for a client that went away.

A streaming response ends with ``data: [DONE]``; an error after the stream started (the status line
is gone by then) is sent as one ``data: {"error": {...}}`` event, as OpenAI and vLLM do.

Disconnects: for streams, Starlette's ``StreamingResponse`` listens for ``http.disconnect`` (ASGI
spec < 2.4, which uvicorn speaks) and cancels the body iterator, whose ``finally`` closes the
engine requests. Non-streaming requests would otherwise keep decoding for nobody, so
``cancel_on_disconnect`` races the work against the disconnect message.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from tokenmill.errors import TokenmillError

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def error_payload(exc: TokenmillError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param,
                      "code": exc.code}}


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    # X-Accel-Buffering: proxies such as nginx must pass tokens on as they come.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the only message left to receive is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task  # let its finally blocks (engine aborts) run before we answer
    except asyncio.CancelledError:
        pass
    raise ClientDisconnected()
