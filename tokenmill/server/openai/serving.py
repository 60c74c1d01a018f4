"""What chat and completions share: building SamplingParams from a body, admitting one engine
request per prompt, reading their outputs (merged, or the final ones), and usage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.async_llm import AsyncLLM, RequestStream
from tokenmill.engine.outputs import RequestOutput
from tokenmill.errors import InvalidRequestError, InvalidSamplingParamsError, TokenmillError
from tokenmill.openai_protocol import SSE_DONE, error_payload, sse_event, sse_response
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.openai.protocol import SamplingFields
from tokenmill.server.request_logger import log_aborted_request
from tokenmill.server.sse import ClientDisconnected, cancel_on_disconnect
from tokenmill.server.state import server_state

TENANT_HEADER = "x-tokenmill-tenant"
"""Set by the gateway: whose request this is (request traces are shown to that tenant only)."""


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def prompt_request_id(base_id: str, prompt_index: int, num_prompts: int) -> str:
    """The engine request id of one prompt of a response (the response id itself if only one)."""
    return base_id if num_prompts == 1 else f"{base_id}-{prompt_index}"


def build_sampling_params(body: SamplingFields, *, max_tokens: int | None,
                          logprobs: int | None, renames: dict[str, str] | None = None
                          ) -> SamplingParams:
    """SamplingParams validates every range; its errors are re-labelled with the body's names."""
    kwargs = body.to_sampling_kwargs()
    kwargs.update(max_tokens=max_tokens, logprobs=logprobs)
    try:
        return SamplingParams(**kwargs)
    except InvalidSamplingParamsError as exc:
        raise relabelled(exc, renames or {}) from None


def relabelled(exc: InvalidRequestError, renames: dict[str, str]) -> InvalidRequestError:
    """The same error, naming the field as the client spelled it (max_completion_tokens...)."""
    name = renames.get(exc.param or "")
    if name is None or exc.param is None:
        return exc
    return type(exc)(exc.message.replace(exc.param, name, 1), param=name, code=exc.code)


class RequestGroup:
    """The engine requests behind one HTTP request (one per prompt), admitted together.

    Closing the group aborts whatever has not finished, which frees its KV blocks at once.
    """

    def __init__(self, streams: list[RequestStream], metrics: ServerMetrics,
                 request_id: str = ""):
        self.streams = streams
        self.request_id = request_id
        """The response id (``cmpl-...``): the ``x-request-id`` header and the trace's URL."""
        self.metrics = metrics
        self._unfinished = {s.request_id for s in streams}

    @classmethod
    async def start(cls, engine: AsyncLLM, metrics: ServerMetrics, base_id: str,
                    prompts: list[list[int]], params: list[SamplingParams],
                    cache_salt: str | None, pooling: str | None = None,
                    priority: int = 0) -> RequestGroup:
        # Admit concurrently: the engine thread takes its whole inbox between two steps, so n
        # prompts cost one step boundary, not n.
        ids = [prompt_request_id(base_id, i, len(prompts)) for i in range(len(prompts))]
        results = await asyncio.gather(
            *(engine.add_request(p, sp, rid, cache_salt, pooling=pooling, priority=priority)
              for p, sp, rid in zip(prompts, params, ids, strict=True)),
            return_exceptions=True)
        streams = [r for r in results if isinstance(r, RequestStream)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for stream in streams:
                await stream.aclose()
            if isinstance(errors[0], TokenmillError):
                errors[0].request_id = base_id
            raise errors[0]
        return cls(streams, metrics, base_id)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as each engine step produces them, across all prompts."""
        if len(self.streams) == 1:
            async for output in self.streams[0]:
                self._seen(output)
                yield 0, output
            return
        # One read outstanding per stream, never a queue in between: a prompt's outputs that the
        # client has not taken yet stay coalesced in its RequestStream (bounded), not piled up here.
        reads = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(self.streams)}
        try:
            while reads:
                done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
                for read in sorted(done, key=reads.__getitem__):
                    index = reads.pop(read)
                    output = read.result()  # an engine error ends the whole response
                    self._seen(output)
                    yield index, output
                    if not output.finished:
                        reads[asyncio.ensure_future(anext(self.streams[index]))] = index
        finally:
            for read in reads:
                read.cancel()

    async def final_outputs(self) -> list[RequestOutput]:
        """The finished output of each prompt, in prompt order."""
        finals: list[RequestOutput | None] = [None] * len(self.streams)
        async for index, output in self.outputs():
            if output.finished:
                finals[index] = output
        assert all(f is not None for f in finals)
        return finals  # type: ignore[return-value]

    async def aclose(self) -> None:
        for stream in self.streams:
            if stream.request_id in self._unfinished:
                self.metrics.record_abort(stream.request_id)
                log_aborted_request(stream.request_id, "closed before it finished (client "
                                    "disconnected or server shutting down)")
            await stream.aclose()

    def _seen(self, output: RequestOutput) -> None:
        if output.finished:
            self._unfinished.discard(output.request_id)


def usage(prompt_lengths: list[int], outputs: list[RequestOutput]) -> dict[str, Any]:
    """Prompt tokens count once per prompt; completion tokens add up over every choice."""
    num_prompt = sum(prompt_lengths)
    num_completion = sum(o.num_generated_tokens for o in outputs)
    num_cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion,
            "prompt_tokens_details": {"cached_tokens": num_cached}}


async def respond(request: Request, group: RequestGroup, stream: bool,
                  events: Callable[[], AsyncIterator[str]],
                  body: Callable[[list[RequestOutput]], dict[str, Any]]) -> Response:
    """Stream ``events()`` as SSE, or wait for every final output and answer ``body(finals)`` as
    JSON. Either way a client that goes away aborts the group and frees its KV blocks.
    Every answer carries the response id in ``x-request-id`` (the key of its trace)."""
    headers = {"x-request-id": group.request_id}
    tenant = request.headers.get(TENANT_HEADER)
    engine = server_state(request).engine
    if tenant is not None and engine is not None:  # before the id goes out: nobody can ask sooner
        for request_stream in group.streams:
            engine.traces.set_owner(request_stream.request_id, tenant)
    if stream:
        response = sse_response(events())
        response.headers.update(headers)
        return response

    async def collect() -> list[RequestOutput]:
        try:
            return await group.final_outputs()
        finally:
            await group.aclose()

    try:
        finals = await cancel_on_disconnect(request, collect())
    except ClientDisconnected:
        return Response(status_code=499, headers=headers)
    return JSONResponse(body(finals), headers=headers)


async def sse_events(group: RequestGroup, chunks: AsyncIterator[dict[str, Any]],
                     usage_chunk: Callable[[], dict[str, Any] | None]) -> AsyncIterator[str]:
    """The SSE framing completions and chat share: each chunk as an event, then the usage chunk
    (when the request asked for one), then ``[DONE]``. An engine error after the status line went
    out becomes one error event; the group is closed (aborting what is unfinished) however the
    stream ends, including a client that goes away."""
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
        final = usage_chunk()
        if final is not None:
            yield sse_event(final)
        yield SSE_DONE
    except TokenmillError as exc:
        yield sse_event(error_payload(exc))
    finally:
        await group.aclose()
