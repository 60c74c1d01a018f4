"""``POST /v1/chat/completions``: messages through the model's chat template, then the engine.

The rendered template already holds the special tokens, so it is encoded without adding any (as
``LLM.chat`` does) and handed to the engine as token ids. Streams send, per choice, a first delta
with the role, then content deltas, then one with the ``finish_reason``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.server.openai.logprobs import TokenTexts, chat_logprobs
from tokenmill.server.openai.protocol import ChatCompletionRequest
from tokenmill.server.openai.serving import (
    RequestGroup,
    build_sampling_params,
    default_max_tokens,
    new_request_id,
    relabelled,
    respond,
    sse_events,
    usage,
)
from tokenmill.server.openapi import GENERATION_RESPONSES
from tokenmill.server.state import ServerState, server_state

router = APIRouter()


def render_messages(state: ServerState, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    engine = state.require_engine()
    messages = [m.for_template() for m in body.messages]
    text = engine.input_processor.render_chat(messages, body.add_generation_prompt)
    return text, engine.tokenizer.encode(text, add_special_tokens=False)


class _Chat:
    def __init__(self, state: ServerState, body: ChatCompletionRequest):
        self.state = state
        self.body = body
        self.engine = state.require_engine()
        self.request_id = new_request_id("chatcmpl")
        self.created = int(time.time())
        self.texts = TokenTexts(self.engine.tokenizer)
        _, self.prompt_ids = render_messages(state, body)
        self.num_top = body.top_logprobs or 0

    async def start(self) -> RequestGroup:
        field, max_tokens = self.body.requested_max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens(self.engine, self.state.kv_pool_tokens,
                                            len(self.prompt_ids))
        renames = {"max_tokens": field, "logprobs": "top_logprobs"}
        params = build_sampling_params(
            self.body, max_tokens=max_tokens,
            logprobs=self.num_top if self.body.logprobs else None, renames=renames)
        try:
            return await RequestGroup.start(self.engine, self.state.metrics, self.request_id,
                                            [self.prompt_ids], [params], self.body.cache_salt)
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

    def response(self, final: RequestOutput) -> dict[str, Any]:
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.logprobs(c.logprobs),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                   for c in final.outputs]
        body = self.envelope("chat.completion", choices)
        body["usage"] = usage([len(self.prompt_ids)], [final])
        return body

    def chunk(self, completion: CompletionOutput, delta: dict[str, Any]) -> dict[str, Any]:
        return {"index": completion.index, "delta": delta,
                "logprobs": self.logprobs(completion.delta_logprobs),
                "finish_reason": completion.finish_reason,
                "stop_reason": completion.stop_reason}

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
            choices = []
            for completion in output.outputs:
                if completion.index in done:
                    continue
                if not (completion.delta_text or completion.finished
                        or completion.delta_logprobs):
                    continue
                delta = {"content": completion.delta_text} if completion.delta_text else {}
                choices.append(self.chunk(completion, delta))
                if completion.finished:
                    done.add(completion.index)
            if choices:
                yield self.envelope("chat.completion.chunk", choices)


@router.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    state.check_model(body.model)
    chat = _Chat(state, body)
    group = await chat.start()
    return await respond(request, group, body.stream, lambda: chat.events(group),
                         lambda finals: chat.response(finals[0]))
