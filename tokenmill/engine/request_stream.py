"""``RequestStream``: what ``AsyncLLM.add_request`` returns, one per request, read by its caller.

The engine never waits for a reader: each step's output is handed to the stream at once. A reader
that falls behind (a slow streaming client whose socket is full) does not make outputs pile up:
unread outputs are coalesced into one (their deltas concatenated), so what a stream holds is
bounded by what its request generated since the last read. Past ``max_unread_tokens`` unread
tokens the request is aborted and the reader gets a ``SlowReaderError``, so one stuck client
cannot hold KV blocks and memory without end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tokenmill.engine.outputs import RequestOutput
from tokenmill.errors import SlowReaderError


class RequestStream:
    def __init__(self, request_id: str, num_prompt_tokens: int, max_unread_tokens: int,
                 abort: Callable[[str], Awaitable[None]]):
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.max_unread_tokens = max_unread_tokens
        self._abort = abort
        self._pending: RequestOutput | None = None
        self._pending_text: list[list[str]] = []  # per sample: delta texts to join at read time
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._finished = False  # the reader has seen the last output (or an error)
        self._closed = False  # no more outputs will be put (finished, failed or aborted)
        self.num_unread_tokens = 0
        self.num_coalesced = 0  # outputs merged into an unread one (how far behind readers got)

    # ----------------------------------------------------------------- engine side (event loop)
    def put(self, output: RequestOutput) -> bool:
        """Hand over one step's output; False when the reader fell too far behind (the caller
        aborts the request in the core)."""
        if self._closed:
            return True
        if self._pending is None:
            self._pending = output
            self._pending_text = [[c.delta_text] for c in output.outputs]
        else:
            _merge(self._pending, output)
            for parts, completion in zip(self._pending_text, output.outputs):
                parts.append(completion.delta_text)
            self.num_coalesced += 1
        self.num_unread_tokens += sum(len(c.delta_token_ids) for c in output.outputs)
        if output.finished:
            self._closed = True
        elif self.num_unread_tokens > self.max_unread_tokens:
            self.fail(SlowReaderError(
                f"the client left {self.num_unread_tokens} generated tokens unread, more than "
                f"max_unread_tokens={self.max_unread_tokens}; the request was aborted"))
            return False
        self._ready.set()
        return True

    def fail(self, error: BaseException) -> None:
        """End the stream with an error (what was generated but not read is dropped)."""
        if self._pending is not None and self._pending.finished:
            return  # it finished first: let the reader have the answer
        self._closed = True
        self._error = error
        self._pending = None
        self._ready.set()

    # ----------------------------------------------------------------- reader side
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        while self._pending is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._pending is not None:
            output, self._pending = self._pending, None
            if self.num_coalesced:  # joined once per read: linear in the text, however late
                for completion, parts in zip(output.outputs, self._pending_text):
                    completion.delta_text = "".join(parts)
            self.num_unread_tokens = 0
            if output.finished:
                self._finished = True
            return output
        self._finished = True
        assert self._error is not None
        raise self._error

    async def aclose(self) -> None:
        """Stop reading: an unfinished request is aborted and its KV blocks freed."""
        if not self._finished:
            self._finished = True
            if not self._closed:
                self._closed = True
                await self._abort(self.request_id)


def _merge(into: RequestOutput, new: RequestOutput) -> None:
    """Fold a newer output into an unread one: deltas concatenate (text is joined at read time),
    the rest is the newer state; a final output brings each whole sample."""
    for old, fresh in zip(into.outputs, new.outputs):
        old.delta_token_ids.extend(fresh.delta_token_ids)
        if old.delta_logprobs is not None and fresh.delta_logprobs is not None:
            old.delta_logprobs.extend(fresh.delta_logprobs)
        old.finish_reason, old.stop_reason = fresh.finish_reason, fresh.stop_reason
        if new.finished:
            old.text, old.token_ids, old.logprobs = fresh.text, fresh.token_ids, fresh.logprobs
    into.finished = new.finished
    into.num_cached_tokens = new.num_cached_tokens
    into.metrics = new.metrics
