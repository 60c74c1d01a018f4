"""``POST /v1/completions``: text or token-id prompts, one engine request per prompt.

Choice indices follow OpenAI: prompt ``p``'s ``i``-th sample is choice ``p * n + i``. With ``echo``
and ``logprobs`` the prompt's tokens are scored in the prefill pass and lead the choice's
``logprobs`` (the first with ``None``, as OpenAI answers); ``max_tokens: 0`` then scores the prompt
only (lm-evaluation-harness's loglikelihood requests). vLLM's ``prompt_logprobs`` adds its own
``prompt_logprobs`` list to each choice. Everything is
validated and admitted before the response starts, so a bad request gets its status code; an error
after that (shutdown) arrives as an ``error`` event in the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.layers.sampler import TokenLogprobs
from tokenmill.server.openai.logprobs import (
    TokenTexts,
    completion_logprobs,
    echo_logprobs,
    vllm_prompt_logprobs,
)
from tokenmill.server.openai.priority import request_priority
from tokenmill.server.openai.protocol import CompletionRequest
from tokenmill.server.openai.serving import (
    RequestGroup,
    build_sampling_params,
    new_request_id,
    respond,
    sse_events,
    usage,
)
from tokenmill.server.openapi import GENERATION_RESPONSES
from tokenmill.server.state import ServerState, server_state

router = APIRouter()


class _Completion:
    """One /v1/completions call: its prompts, admitted requests, and how to render choices."""

    def __init__(self, state: ServerState, body: CompletionRequest, priority: int = 0):
        self.state = state
        self.body = body
        self.priority = priority
        self.engine = state.require_engine()
        self.request_id = new_request_id("cmpl")
        self.created = int(time.time())
        self.texts = TokenTexts(self.engine.tokenizer)
        self.prompt_ids: list[list[int]] = []
        self.prompt_texts: list[str | None] = []
        for prompt in body.prompts():
            if isinstance(prompt, str):
                # The same encoding the engine applies to a text prompt.
                self.prompt_ids.append(self.engine.tokenizer.encode(prompt))
                self.prompt_texts.append(prompt)
            else:
                self.prompt_ids.append(list(prompt))
                self.prompt_texts.append(None)
        self.text_offsets: dict[int, int] = {}
        self.prompt_scores: dict[int, list[TokenLogprobs | None]] = {}
        """Prompt index -> its prompt logprobs, once the engine has sent them (they come once,
        and every choice of that prompt renders them)."""

    async def start(self) -> RequestGroup:
        body = self.body
        # max_tokens None: the engine's scheduler picks the default (context and KV pool room)
        params = [build_sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs)
                  for _ in self.prompt_ids]
        try:
            return await RequestGroup.start(self.engine, self.state.metrics, self.request_id,
                                            self.prompt_ids, params, body.cache_salt,
                                            priority=self.priority)
        except InvalidRequestError as exc:
            if exc.param == "prompt_logprobs" and body.prompt_logprobs is None:
                # the prompt is scored because of echo + logprobs: name what the client sent
                message = exc.message.replace("prompt_logprobs:", "echo with logprobs:", 1)
                raise type(exc)(message, param="echo", code=exc.code) from None
            raise

    def prompt_text(self, prompt_index: int) -> str:
        text = self.prompt_texts[prompt_index]
        if text is None:
            text = self.engine.tokenizer.decode(self.prompt_ids[prompt_index])
            self.prompt_texts[prompt_index] = text
        return text

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.engine.model_name, "choices": choices}

    def choice(self, prompt_index: int, completion: CompletionOutput, text: str,
               logprobs: list | None, first: bool) -> dict[str, Any]:
        body = self.body
        index = prompt_index * body.n + completion.index
        echoed = body.echo and first
        if echoed:
            text = self.prompt_text(prompt_index) + text
        rendered_logprobs = None
        if echoed and body.logprobs is not None:
            # the prompt's tokens first (offsets from 0), then the completion's after them
            rendered_logprobs, self.text_offsets[index] = echo_logprobs(
                self.prompt_ids[prompt_index], self.prompt_scores[prompt_index], self.texts,
                body.logprobs)
        if logprobs is not None:
            generated, self.text_offsets[index] = completion_logprobs(
                logprobs, self.texts, self.text_offsets.get(index, 0))
            if rendered_logprobs is None:
                rendered_logprobs = generated
            else:
                for key, values in generated.items():
                    rendered_logprobs[key].extend(values)
        choice = {"index": index, "text": text, "logprobs": rendered_logprobs,
                  "finish_reason": completion.finish_reason,
                  "stop_reason": completion.stop_reason}
        if body.prompt_logprobs is not None and first:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(
                self.prompt_scores[prompt_index], self.texts, body.prompt_logprobs)
        return choice

    def note_prompt_scores(self, prompt_index: int, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_scores[prompt_index] = output.prompt_logprobs

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        for prompt_index, output in enumerate(finals):
            self.note_prompt_scores(prompt_index, output)
        choices = [self.choice(p, c, c.text, c.logprobs, True)
                   for p, output in enumerate(finals) for c in output.outputs]
        choices.sort(key=lambda c: c["index"])
        body = self.envelope(choices)
        body["usage"] = usage([len(ids) for ids in self.prompt_ids], finals)
        return body

    def events(self, group: RequestGroup) -> AsyncIterator[str]:
        latest: dict[int, RequestOutput] = {}

        def usage_chunk() -> dict[str, Any] | None:
            if not self.body.include_usage_in_stream:
                return None
            final = self.envelope([])
            final["usage"] = usage([len(ids) for ids in self.prompt_ids],
                                   [latest[i] for i in sorted(latest)])
            return final

        return sse_events(group, self._chunks(group, latest), usage_chunk)

    async def _chunks(self, group: RequestGroup, latest: dict[int, RequestOutput]
                      ) -> AsyncIterator[dict[str, Any]]:
        started: set[int] = set()
        done: set[int] = set()
        async for prompt_index, output in group.outputs():
            latest[prompt_index] = output
            self.note_prompt_scores(prompt_index, output)
            choices = []
            for completion in output.outputs:
                index = prompt_index * self.body.n + completion.index
                if index in done:
                    continue
                has_news = (completion.delta_text or completion.finished
                            or completion.delta_logprobs)
                if not has_news:
                    continue
                choices.append(self.choice(prompt_index, completion, completion.delta_text,
                                           completion.delta_logprobs, index not in started))
                started.add(index)
                if completion.finished:
                    done.add(index)
            if choices:
                yield self.envelope(choices)


@router.post("/v1/completions", responses=GENERATION_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = server_state(request)
    state.check_model(body.model)
    completion = _Completion(state, body, request_priority(body.priority, request.headers))
    group = await completion.start()
    return await respond(request, group, body.stream, lambda: completion.events(group),
                         completion.response)
