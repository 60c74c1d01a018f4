"""Watching for a client that went away.

The events themselves (``data: <json>``, ``data: [DONE]``, the error event sent once the status
line is gone) and the streaming response are ``tokenmill/openai_protocol.py``, shared with the
gateway.

Disconnects: for streams, Starlette's ``StreamingResponse`` listens for ``http.disconnect`` (ASGI
spec < 2.4, which uvicorn speaks) and cancels the body iterator, whose ``finally`` closes the
engine requests. Non-streaming requests would otherwise keep decoding for nobody, so
``cancel_on_disconnect`` races the work against the disconnect message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


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
