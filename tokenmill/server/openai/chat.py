"""``POST /v1/chat/completions``: messages through the model's chat template, then the engine.

The rendered template already holds the special tokens, so it is encoded without adding any (as
``LLM.chat`` does) and handed to the engine as token ids. Streams send, per choice, a first delta
with the role, then content deltas, then one with the ``finish_reason``.

Tools (``tool_calls.py``) shape the prompt and, for ``tool_choice`` required or a named function,
the grammar; each choice's output goes through an extractor that splits it into content and
tool-call pieces. A streamed call is sent the way OpenAI sends it: a first delta with the call's
index, id, type, name and empty arguments, then argument fragments; ``finish_reason`` is
``tool_calls`` when the answer holds calls. ``/v1/responses`` runs on this same class.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.server.openai.logprobs import TokenTexts, chat_logprobs
from tokenmill.server.openai.priority import request_priority
from tokenmill.server.openai.protocol import ChatCompletionRequest
from tokenmill.server.openai.serving import (
    RequestGroup,
    build_sampling_params,
    new_request_id,
    relabelled,
    respond,
    sse_events,
    usage,
)
from tokenmill.server.openai.tool_call_stream import (
    ArgumentsPiece,
    AssembledMessage,
    CallStart,
    ContentPiece,
    Extractor,
    Piece,
    assemble,
)
from tokenmill.server.openai.tool_calls import ToolPlan
from tokenmill.server.openai.tool_parsers import make_parser
from tokenmill.server.openapi import GENERATION_RESPONSES
from tokenmill.server.state import ServerState, server_state

router = APIRouter()


def tool_plan(state: ServerState, body: ChatCompletionRequest) -> ToolPlan:
    engine = state.require_engine()
    parser = make_parser(state.settings.tools.tool_call_parser, engine.tokenizer.chat_template)
    return ToolPlan.from_request(body, parser)


class ChatRun:
    """One chat request from body to answer; ``/v1/responses`` drives it too."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest,
                 id_prefix: str = "chatcmpl", priority: int = 0):
        self.state = state
        self.body = body
        self.priority = priority
        self.engine = state.require_engine()
        self.request_id = new_request_id(id_prefix)
        self.created = int(time.time())
        self.texts = TokenTexts(self.engine.tokenizer)
        self.tools = tool_plan(state, body)
        text = self.tools.render(self.engine, body.messages, body.add_generation_prompt)
        self.prompt_ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        self.num_top = body.top_logprobs or 0
        self.extractors: dict[int, Extractor] = {}

    async def start(self) -> RequestGroup:
        # max_tokens None: the engine's scheduler picks the default (context and KV pool room)
        field, max_tokens = self.body.requested_max_tokens
        renames = {"max_tokens": field, "logprobs": "top_logprobs"}
        params = build_sampling_params(
            self.body, max_tokens=max_tokens,
            logprobs=self.num_top if self.body.logprobs else None, renames=renames)
        for spec in self.tools.parameter_specs():  # a schema that cannot be enforced is a 400
            await self.engine.input_processor.grammars.compile_async(spec)
        forced = self.tools.grammar_spec()
        if forced is not None:
            params = dataclasses.replace(params, structured_output=forced)
        if self.tools.keeps_special_tokens:  # the parser's markers are special tokens
            params = dataclasses.replace(params, skip_special_tokens=False)
        try:
            return await RequestGroup.start(self.engine, self.state.metrics, self.request_id,
                                            [self.prompt_ids], [params], self.body.cache_salt,
                                            priority=self.priority)
        except InvalidRequestError as exc:  # e.g. "prompt plus max_tokens over the context"
            raise relabelled(exc, renames) from None

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created,
                "model": self.engine.model_name, "system_fingerprint": None,
                "choices": choices}

    def logprobs(self, entries: list | None) -> dict[str, Any] | None:
        if entries is None or not self.body.logprobs:
            return None
        return chat_logprobs(entries, self.texts, self.num_top)

    def extractor(self, index: int) -> Extractor:
        if index not in self.extractors:
            self.extractors[index] = self.tools.new_extractor()
        return self.extractors[index]

    def finish_reason(self, completion: CompletionOutput) -> str | None:
        if completion.finish_reason == "stop" and self.extractor(completion.index).num_calls:
            return "tool_calls"
        return completion.finish_reason

    def message(self, completion: CompletionOutput) -> AssembledMessage:
        """A finished choice's output as content and tool calls."""
        extractor = self.extractor(completion.index)
        return assemble([*extractor.feed(completion.text), *extractor.finish()])

    def new_pieces(self, completion: CompletionOutput) -> list[Piece]:
        """What a streamed choice's latest output adds."""
        extractor = self.extractor(completion.index)
        pieces = extractor.feed(completion.delta_text or "")
        if completion.finished:
            pieces += extractor.finish()
        return pieces

    def response(self, final: RequestOutput) -> dict[str, Any]:
        choices = []
        for c in final.outputs:
            assembled = self.message(c)
            message: dict[str, Any] = {"role": "assistant", "content": assembled.content}
            if assembled.tool_calls:
                message["tool_calls"] = assembled.tool_calls
            choices.append({"index": c.index, "message": message,
                            "logprobs": self.logprobs(c.logprobs),
                            "finish_reason": self.finish_reason(c),
                            "stop_reason": c.stop_reason})
        body = self.envelope("chat.completion", choices)
        body["usage"] = usage([len(self.prompt_ids)], [final])
        return body

    def chunks_of(self, completion: CompletionOutput) -> list[dict[str, Any]]:
        """The choice entries a streamed choice's latest output becomes, one per chunk: a new
        call's first delta (name, empty arguments) never shares a chunk with its arguments."""
        deltas = _deltas(self.new_pieces(completion))
        if not deltas and not (completion.finished or completion.delta_logprobs):
            return []
        entries = [{"index": completion.index, "delta": delta, "logprobs": None,
                    "finish_reason": None, "stop_reason": None} for delta in deltas or [{}]]
        entries[0]["logprobs"] = self.logprobs(completion.delta_logprobs)
        if completion.finished:
            entries[-1]["finish_reason"] = self.finish_reason(completion)
            entries[-1]["stop_reason"] = completion.stop_reason
        return entries

    def events(self, group: RequestGroup) -> AsyncIterator[str]:
        latest: list[RequestOutput] = []

        def usage_chunk() -> dict[str, Any] | None:
            if not (self.body.include_usage_in_stream and latest):
                return None
            final = self.envelope("chat.completion.chunk", [])
            final["usage"] = usage([len(self.prompt_ids)], latest[-1:])
            return final

        return sse_events(group, self._chunks(group, latest), usage_chunk)

    async def _chunks(self, group: RequestGroup, latest: list[RequestOutput]
                      ) -> AsyncIterator[dict[str, Any]]:
        started: set[int] = set()
        done: set[int] = set()
        async for _, output in group.outputs():
            latest[:] = [output]
            # The role goes first, in its own chunk: naive clients read choices[0] only, so
            # one chunk never holds two entries for the same choice.
            roles = [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None}
                     for c in output.outputs if c.index not in started]
            if roles:
                started.update(r["index"] for r in roles)
                yield self.envelope("chat.completion.chunk", roles)
            per_choice = []
            for completion in output.outputs:
                if completion.index in done:
                    continue
                per_choice.append(self.chunks_of(completion))
                if completion.finished:
                    done.add(completion.index)
            for entries in itertools.zip_longest(*per_choice):
                yield self.envelope("chat.completion.chunk", [e for e in entries if e])


def _deltas(pieces: list[Piece]) -> list[dict[str, Any]]:
    """Pieces as OpenAI deltas: neighbouring content joins, a call's start is its own delta and
    the argument fragments after it join into one."""
    deltas: list[dict[str, Any]] = []
    for piece in pieces:
        last = deltas[-1] if deltas else None
        if isinstance(piece, ContentPiece):
            if last is not None and "content" in last:
                last["content"] += piece.text
            else:
                deltas.append({"content": piece.text})
        elif isinstance(piece, CallStart):
            deltas.append({"tool_calls": [{"index": piece.index, "id": piece.id,
                                           "type": "function",
                                           "function": {"name": piece.name, "arguments": ""}}]})
        elif isinstance(piece, ArgumentsPiece):
            calls = last.get("tool_calls") if last is not None else None
            if calls and calls[0]["index"] == piece.index and "id" not in calls[0]:
                calls[0]["function"]["arguments"] += piece.text
            else:
                deltas.append({"tool_calls": [{"index": piece.index,
                                               "function": {"arguments": piece.text}}]})
    return deltas


@router.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    state.check_model(body.model)
    chat = ChatRun(state, body, priority=request_priority(body.priority, request.headers))
    group = await chat.start()
    return await respond(request, group, body.stream, lambda: chat.events(group),
                         lambda finals: chat.response(finals[0]))
