"""Every error leaves the server in OpenAI's shape, ``{"error": {message, type, param, code}}``.

* tokenmill errors carry their own status (400 / 429 + Retry-After / 503 ...);
* FastAPI's 422 for a body that does not fit the schema becomes a 400 naming the field, as OpenAI
  answers; malformed JSON is a 400 too;
* unknown routes are 404 and wrong methods 405, in the same shape;
* anything else is a bug: 500 with a generic message (details only in the log), and the server
  carries on.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.openai_protocol import error_body, error_response

logger = logging.getLogger(__name__)

# Labels pydantic puts into an error location for union members and validators, not field names.
_LOC_NOISE = {"str", "int", "float", "bool", "list", "dict", "none", "function-after",
              "function-before", "function-plain", "function-wrap"}


# Where FastAPI says a parameter came from; the first item of a location, not part of the name.
_LOC_SOURCES = {"body", "query", "path", "header", "cookie"}


def param_path(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``;
    ``("query", "since")`` -> ``"since"``."""
    path = ""
    for index, part in enumerate(loc):
        if index == 0 and part in _LOC_SOURCES:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part not in _LOC_NOISE and "[" not in part:
            path += f".{part}" if path else part
    return path or None


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    if not errors:
        return InvalidRequestError("the request body is not valid")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return InvalidRequestError(f"the request body is not valid JSON: {detail}".rstrip(": "),
                                   code="invalid_json")
    param = param_path(tuple(first.get("loc", ())))
    if kind == "missing":
        return InvalidRequestError(f"{param!r} is required", param=param)
    if kind == "extra_forbidden":
        return InvalidRequestError(f"unknown or unsupported parameter {param!r}", param=param)
    if param is None:  # the body itself is not an object
        return InvalidRequestError("the request body must be a JSON object")
    message = first.get("msg", "is not valid").removeprefix("Value error, ")
    given = repr(first.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    return InvalidRequestError(f"{param}: {message} (got {given})", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenmillError)
    async def tokenmill_error(request: Request, exc: TokenmillError) -> JSONResponse:
        if exc.status_code >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(message, "invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("bug while serving %s %s", request.method, request.url.path)
        return error_response(TokenmillError("internal server error; see the server log"))
