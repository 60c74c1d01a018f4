"""A small OpenAI-compatible streaming server whose timing and failures a test sets.

It speaks the real wire format (the official ``openai`` client reads it, see test_fake_server.py):
``data: {chunk}\\n\\n`` events, a usage chunk with empty ``choices`` when asked for with
``stream_options.include_usage``, and ``data: [DONE]``. It runs under uvicorn on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"


@dataclass
class Behavior:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    fail_every: int = 0  # every k-th request answers HTTP 500 (0 = never)
    malformed: bool = False  # send a non-JSON event after the first token
    send_usage: bool = True  # honour stream_options.include_usage
    prompt_tokens: int = 11  # what usage reports as prompt_tokens
    crlf_multiline: bool = False  # legal SSE framed unusually: CRLF, comments, JSON over lines


class FakeOpenAI:
    def __init__(self) -> None:
        self.behavior = Behavior()
        self.num_requests = 0
        self.prompts: list[str] = []  # what each request asked, in arrival order
        self.lock = threading.Lock()
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ])

    def reset(self, **changes: object) -> None:
        self.behavior = Behavior(**changes)  # type: ignore[arg-type]
        self.num_requests = 0
        self.prompts = []

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "tests"}]})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        body = await request.json()
        with self.lock:
            self.num_requests += 1
            number = self.num_requests
            self.prompts.append(body.get("prompt") or json.dumps(body.get("messages")))
        b = self.behavior
        if b.fail_every and number % b.fail_every == 0:
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        num_tokens = int(body.get("max_tokens") or 16)
        usage = bool((body.get("stream_options") or {}).get("include_usage")) and b.send_usage
        return StreamingResponse(self._stream(chat, num_tokens, usage, b),
                                 media_type="text/event-stream")

    async def _stream(self, chat: bool, num_tokens: int, usage: bool,
                      b: Behavior) -> AsyncIterator[str]:
        created = int(time.time())
        base = {"id": "cmpl-fake", "created": created, "model": MODEL,
                "object": "chat.completion.chunk" if chat else "text_completion"}

        def event(payload: dict) -> str:
            if b.crlf_multiline:
                lines = json.dumps(payload, indent=1).split("\n")
                return ": ping\r\nevent: message\r\n" + "".join(
                    f"data: {line}\r\n" for line in lines) + "\r\n"
            return f"data: {json.dumps(payload)}\n\n"

        def choice(text: str, finish: str | None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {},
                        "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if chat:  # OpenAI opens with an empty-content role chunk; it must not count as TTFT
            yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
        await asyncio.sleep(b.ttft_s)
        for i in range(num_tokens):
            if i:
                await asyncio.sleep(b.itl_s)
            yield event({**base, "choices": [choice(f" t{i}", None)]})
            if b.malformed:
                yield "data: {this is not json\n\n"
                return
        yield event({**base, "choices": [choice("", "length")]})
        if usage:
            yield event({**base, "choices": [], "usage": {
                "prompt_tokens": b.prompt_tokens, "completion_tokens": num_tokens,
                "total_tokens": b.prompt_tokens + num_tokens}})
        yield "data: [DONE]\r\n\r\n" if b.crlf_multiline else "data: [DONE]\n\n"


class ServerThread:
    """uvicorn on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app: object) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
