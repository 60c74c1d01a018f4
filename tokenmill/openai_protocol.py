"""The OpenAI wire details the server and the gateway both write: one home for each.

* The error envelope, ``{"error": {message, type, param, code}}``, as a JSON body (with the
  status of the tokenmill error, ``Retry-After`` on a 429 and ``x-request-id`` when the request
  already had one) or as the payload of a stream's last event once the status line is gone.
* Server-sent events as OpenAI streams them: ``data: <json>`` (optionally after ``event: <kind>``,
  as the Responses API sends them), then a blank line; chat and completion streams end with
  ``data: [DONE]``. JSON is compact and keeps non-ASCII text as it is (fewer bytes per token than
  ``\\uXXXX`` escapes); every stream tokenmill writes uses this one setting.

Reading streams is ``tokenmill/sse_parser.py``. Neither side imports the other: the gateway talks
to servers only over HTTP, and this module is what they agree on.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.errors import RequestRejectedError, TokenmillError

SSE_DONE = "data: [DONE]\n\n"


def to_json(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def sse_event(payload: dict[str, Any], kind: str | None = None) -> str:
    """One event; ``kind`` becomes an ``event:`` line (the Responses API names its events)."""
    head = f"event: {kind}\n" if kind is not None else ""
    return f"{head}data: {to_json(payload)}\n\n"


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None
                 ) -> StreamingResponse:
    # X-Accel-Buffering: proxies such as nginx must pass tokens on as they come.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      **(headers or {})})


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_payload(exc: TokenmillError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.param, exc.code)


def error_response(exc: TokenmillError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer for a tokenmill error: its status and OpenAI's body."""
    headers = dict(headers or {})
    if exc.request_id is not None:  # e.g. a 429: the client can still quote the id
        headers["x-request-id"] = exc.request_id
    if isinstance(exc, RequestRejectedError):
        # whole seconds, and never 0: "retry at once" would only repeat the refusal
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_seconds)))
    return JSONResponse(error_payload(exc), status_code=exc.status_code, headers=headers)
