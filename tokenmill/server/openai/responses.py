"""``POST /v1/responses``: OpenAI's Responses API as a translation layer onto the chat route.

The body becomes a chat request (``responses_protocol.py``: instructions as the system message,
input items as messages, flat function tools as chat tools, ``text.format`` as
``response_format``), runs through ``ChatRun`` exactly as ``/v1/chat/completions`` would (same
template, tool plan, grammar and extractors), and its pieces come back as Responses output items:
a ``message`` item with one ``output_text`` part, and one ``function_call`` item per call.

Streams are typed server-sent events (``event: <type>`` and a JSON ``data`` carrying the same
``type`` and a ``sequence_number``), in OpenAI's order: ``response.created``,
``response.in_progress``, then per item ``response.output_item.added``, its content events
(``response.content_part.added``, ``response.output_text.delta`` ... ``.done``,
``response.content_part.done``; or ``response.function_call_arguments.delta`` ... ``.done``),
``response.output_item.done``, and last ``response.completed`` (``response.incomplete`` when
``max_output_tokens`` cut it short). No ``[DONE]``: the Responses API does not send one.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from tokenmill.engine.outputs import RequestOutput
from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.openai_protocol import sse_event
from tokenmill.server.error_handlers import validation_error
from tokenmill.server.openai.chat import ChatRun
from tokenmill.server.openai.priority import request_priority
from tokenmill.server.openai.responses_protocol import NamedFunctionChoice, ResponsesRequest
from tokenmill.server.openai.serving import RequestGroup, respond
from tokenmill.server.openai.tool_call_stream import ArgumentsPiece, CallStart, ContentPiece, Piece
from tokenmill.server.openapi import GENERATION_RESPONSES
from tokenmill.server.state import server_state

router = APIRouter()

# Chat's names for fields that the Responses API spells differently.
_RENAMES = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
            "response_format.json_schema.schema": "text.format.schema",
            "response_format.json_schema.name": "text.format.name",
            "tool_choice.function.name": "tool_choice.name"}


def _relabelled(exc: InvalidRequestError) -> InvalidRequestError:
    param = exc.param or ""
    name = _RENAMES.get(param)
    if name is None and param.startswith("tools[") and ".function." in param:
        name = param.replace(".function.", ".", 1)
    if name is None:
        return exc
    return type(exc)(exc.message.replace(param, name), param=name, code=exc.code)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class _Response:
    """The response object and its output items, as they are built."""

    def __init__(self, run: ChatRun, body: ResponsesRequest):
        self.run = run
        self.body = body
        self.id = run.request_id
        self.created_at = run.created
        self.output: list[dict[str, Any]] = []

    def snapshot(self, status: str, final: RequestOutput | None = None) -> dict[str, Any]:
        body = self.body
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
        fmt = body.text.format if body.text is not None and body.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.run.engine.model_name, "output": self.output,
            "error": None, "incomplete_details": incomplete,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": (body.tool_choice.model_dump()
                            if isinstance(body.tool_choice, NamedFunctionChoice)
                            else body.tool_choice or "auto"),
            "tools": [{"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": t.strict}
                      for t in body.tools or []],
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt
                     else {"type": "text"}},
            "store": False, "metadata": body.metadata or {}, "user": body.user,
            "previous_response_id": None, "truncation": "disabled",
            "usage": None if final is None else self.usage(final),
        }

    def usage(self, final: RequestOutput) -> dict[str, Any]:
        num_input = len(self.run.prompt_ids)
        num_output = final.num_generated_tokens
        return {"input_tokens": num_input,
                "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                "output_tokens": num_output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": num_input + num_output}

    def status(self, final: RequestOutput) -> str:
        return "incomplete" if final.outputs[0].finish_reason == "length" else "completed"

    def complete(self, final: RequestOutput) -> dict[str, Any]:
        """The non-streamed answer: the whole output at once."""
        completion = final.outputs[0]
        assembled = self.run.message(completion)
        status = self.status(final)
        if assembled.content:
            self.output.append(_message_item(_item_id("msg"), assembled.content, status))
        for call in assembled.tool_calls:
            self.output.append(_call_item(_item_id("fc"), call["id"], call["function"]["name"],
                                          call["function"]["arguments"], "completed"))
        return self.snapshot(status, final)


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str
               ) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


class _EventWriter:
    """Pieces in, typed events out; keeps the one output item that is open."""

    def __init__(self, response: _Response, emit: Callable[..., str]):
        self.response = response
        self.emit = emit
        self.item: dict[str, Any] | None = None
        self.text: list[str] = []

    @property
    def index(self) -> int:
        return len(self.response.output)

    def add(self, piece: Piece) -> list[str]:
        events: list[str] = []
        if isinstance(piece, ContentPiece):
            if self.item is None or self.item["type"] != "message":
                events += self.close()
                self.item = _message_item(_item_id("msg"), None, "in_progress")
                events.append(self.emit("response.output_item.added", output_index=self.index,
                                        item=self.item))
                events.append(self.emit("response.content_part.added", item_id=self.item["id"],
                                        output_index=self.index, content_index=0,
                                        part=_text_part("")))
            self.text.append(piece.text)
            events.append(self.emit("response.output_text.delta", item_id=self.item["id"],
                                    output_index=self.index, content_index=0,
                                    delta=piece.text, logprobs=[]))
        elif isinstance(piece, CallStart):
            events += self.close()
            self.item = _call_item(_item_id("fc"), piece.id, piece.name, "", "in_progress")
            events.append(self.emit("response.output_item.added", output_index=self.index,
                                    item=self.item))
        elif isinstance(piece, ArgumentsPiece):
            assert self.item is not None and self.item["type"] == "function_call"
            self.text.append(piece.text)
            events.append(self.emit("response.function_call_arguments.delta",
                                    item_id=self.item["id"], output_index=self.index,
                                    delta=piece.text))
        return events

    def close(self, status: str = "completed") -> list[str]:
        item = self.item
        if item is None:
            return []
        text = "".join(self.text)
        events = []
        if item["type"] == "message":
            part = _text_part(text)
            events.append(self.emit("response.output_text.done", item_id=item["id"],
                                    output_index=self.index, content_index=0, text=text,
                                    logprobs=[]))
            events.append(self.emit("response.content_part.done", item_id=item["id"],
                                    output_index=self.index, content_index=0, part=part))
            item = {**item, "content": [part], "status": status}
        else:
            events.append(self.emit("response.function_call_arguments.done",
                                    item_id=item["id"], output_index=self.index,
                                    arguments=text))
            item = {**item, "arguments": text, "status": "completed"}
        events.append(self.emit("response.output_item.done", output_index=self.index,
                                item=item))
        self.response.output.append(item)
        self.item, self.text = None, []
        return events


async def _events(response: _Response, group: RequestGroup) -> AsyncIterator[str]:
    sequence = itertools.count()

    def emit(kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(sequence), **fields}
        return sse_event(data, kind)

    writer = _EventWriter(response, emit)
    try:
        yield emit("response.created", response=response.snapshot("in_progress"))
        yield emit("response.in_progress", response=response.snapshot("in_progress"))
        async for _, output in group.outputs():
            completion = output.outputs[0]
            for piece in response.run.new_pieces(completion):
                for event in writer.add(piece):
                    yield event
            if output.finished:
                status = response.status(output)
                for event in writer.close(status):
                    yield event
                yield emit(f"response.{status}", response=response.snapshot(status, output))
    except TokenmillError as exc:
        yield emit("error", code=exc.code, message=exc.message, param=exc.param)
    finally:
        await group.aclose()


@router.post("/v1/responses", responses=GENERATION_RESPONSES)
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    state = server_state(request)
    state.check_model(body.model)
    try:
        chat_body = body.to_chat_request()
        run = ChatRun(state, chat_body, id_prefix="resp",
                      priority=request_priority(None, request.headers))
        group = await run.start()
    except ValidationError as exc:  # cannot happen for a body that passed ResponsesRequest
        raise _relabelled(validation_error(list(exc.errors()))) from None
    except InvalidRequestError as exc:
        raise _relabelled(exc) from None
    response = _Response(run, body)
    return await respond(request, group, body.stream, lambda: _events(response, group),
                         lambda finals: response.complete(finals[0]))
