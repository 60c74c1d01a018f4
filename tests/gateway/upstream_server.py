"""A small real OpenAI-compatible server for gateway tests, and a uvicorn-in-a-thread runner.

The test controls what the server answers (``reply``), how (``fail_status``, ``delay_s``,
``hold`` to keep requests open, ``gate`` to pause a stream after its first chunk), and reads what
it received (``bodies``). Anything that speaks the OpenAI API at a base URL can replace it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


class ServerThread:
    """Runs an ASGI app with uvicorn on 127.0.0.1 in a daemon thread.

    The socket is bound here, to port 0 unless ``port`` is given, and handed to uvicorn, so the
    port the OS gave is the one served: no other process can take it in between."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port or 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


class FakeUpstream:
    def __init__(self, name: str, models: tuple[str, ...] = ("tiny",)) -> None:
        self.name = name
        self.models = list(models)
        self.reply: Callable[[dict[str, Any]], str] | str | None = None
        self.fail_status: int | None = None
        self.delay_s = 0.0
        self.hold: threading.Event | None = None
        self.gate: threading.Event | None = None
        self.completion_tokens: int | None = None
        self.frame: Callable[[str], str] = lambda data: f"data: {data}\n\n"
        """How one event's data goes on the wire (tests use other legal SSE framings)."""
        self.send_finish = True
        """False: a stream ends without its finish_reason chunk (some servers do)."""
        self.metrics_text: str | None = None
        """What GET /metrics answers (Prometheus text); None: 404, like a non-tokenmill server."""
        self.bodies: list[dict[str, Any]] = []
        self.num_started = 0
        self.lock = threading.Lock()
        self.app = self._build()

    @property
    def num_requests(self) -> int:
        return len(self.bodies)

    def _text(self, body: dict[str, Any]) -> str:
        if callable(self.reply):
            return self.reply(body)
        if isinstance(self.reply, str):
            return self.reply
        return f"answer {self.num_requests} from {self.name}"

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return JSONResponse({"status": "ok"})

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": self.name}
                for m in self.models]})

        @app.get("/metrics")
        async def metrics() -> Response:
            if self.metrics_text is None:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return Response(self.metrics_text, media_type="text/plain; version=0.0.4")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._answer(await request.json(), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._answer(await request.json(), chat=False)

        return app

    async def _answer(self, body: dict[str, Any], chat: bool) -> Response:
        with self.lock:
            self.bodies.append(body)
            self.num_started += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait, 30)
        if self.fail_status:
            return JSONResponse({"error": {"message": "injected failure", "type": "server_error",
                                           "param": None, "code": None}},
                                status_code=self.fail_status)
        text = self._text(body)
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1][:-1]
        prompt = json.dumps(body.get("messages") or body.get("prompt"))
        num_completion = self.completion_tokens or len(words)
        usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": num_completion,
                 "total_tokens": len(prompt) // 4 + num_completion}
        model = body.get("model")
        if not body.get("stream"):
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": "stop"}
            else:
                choice = {"index": 0, "text": text, "finish_reason": "stop"}
            return JSONResponse({"id": "cmpl-fake", "object": "chat.completion" if chat else
                                 "text_completion", "created": int(time.time()), "model": model,
                                 "choices": [choice], "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            base = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else
                    "text_completion", "created": int(time.time()), "model": model}
            for i, word in enumerate(words):
                if chat:
                    delta = {"content": word} if i else {"role": "assistant", "content": word}
                    choice = {"index": 0, "delta": delta, "finish_reason": None}
                else:
                    choice = {"index": 0, "text": word, "finish_reason": None}
                yield self.frame(json.dumps({**base, 'choices': [choice]}))
                if i == 0 and self.gate is not None:
                    await asyncio.to_thread(self.gate.wait, 30)
            last = {"index": 0, "finish_reason": "stop", **({"delta": {}} if chat else
                                                            {"text": ""})}
            if self.send_finish:
                yield self.frame(json.dumps({**base, 'choices': [last]}))
            if include_usage:
                yield self.frame(json.dumps({**base, 'choices': [], 'usage': usage}))
            yield self.frame("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
