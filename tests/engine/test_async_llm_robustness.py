"""AsyncLLM never leaves a caller waiting: an engine thread that dies fails every request in flight
and every request still being admitted, at once; a caller that goes away during admission leaves
nothing generating; a reader that falls behind gets its outputs coalesced, and past the limit an
error, while its blocks are freed. Each test runs under a timeout, so a hang fails it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.llm import engine_config_from_kwargs
from tokenmill.errors import EngineDeadError, SlowReaderError
from tokenmill.sampling_params import SamplingParams

TIMEOUT_S = 60
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def _config(**kwargs: Any) -> Any:
    return engine_config_from_kwargs(None, dtype="float32", kv_cache_memory=2**26,
                                     num_threads=1, **kwargs)


class _Loop:
    """One event loop for a module's engine: an AsyncLLM is bound to the loop that first used it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, TIMEOUT_S))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[AsyncLLM, _Loop]]:
    engine, loop = AsyncLLM(_config(max_unread_tokens=16)), _Loop()
    yield engine, loop
    loop.run(engine.shutdown(timeout=0))
    loop.loop.close()


class _HeldStep:
    """Wraps the core's step: the next call blocks until released, then runs (or raises)."""

    def __init__(self, engine: AsyncLLM, fail: bool = False):
        self.core, self.step, self.fail = engine.core, engine.core.step, fail
        self.entered, self.release = threading.Event(), threading.Event()
        self.core.step = self  # type: ignore[method-assign]

    def __call__(self) -> Any:
        self.core.step = self.step  # type: ignore[method-assign]  # only this one call is held
        self.entered.set()
        self.release.wait(TIMEOUT_S)
        if self.fail:
            raise RuntimeError("injected: the engine thread hit a bug")
        return self.step()


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def _idle(engine: AsyncLLM) -> bool:
    scheduler = engine.core.scheduler
    return not scheduler.requests and scheduler.block_manager.num_used_blocks == 0


def test_engine_death_fails_running_and_admitting_requests_at_once() -> None:
    engine, loop = AsyncLLM(_config()), _Loop()

    async def main() -> None:
        running = await engine.add_request("Once upon a time", LONG, "running")
        await anext(running)
        held = _HeldStep(engine, fail=True)
        await asyncio.to_thread(held.entered.wait, TIMEOUT_S)
        admitting = asyncio.create_task(engine.add_request("Hello", LONG, "admitting"))
        await _until(lambda: "admitting" in engine._admitting)
        held.release.set()
        with pytest.raises(EngineDeadError, match="injected"):
            async for _ in running:
                pass
        with pytest.raises(EngineDeadError):
            await admitting
        with pytest.raises(EngineDeadError):  # and nothing new is taken
            await engine.add_request("Hi", LONG, "after")
        assert not engine.is_running and not engine._streams

    try:
        loop.run(main())
    finally:
        loop.loop.close()


def test_death_listeners_hear_of_it_once() -> None:
    engine, loop = AsyncLLM(_config()), _Loop()
    heard: list[BaseException] = []
    engine.death_listeners.append(heard.append)

    async def main() -> None:
        stream = await engine.add_request("Once upon a time", LONG, "r")
        held = _HeldStep(engine, fail=True)
        held.release.set()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        await _until(lambda: heard)

    try:
        loop.run(main())
    finally:
        loop.loop.close()
    assert len(heard) == 1 and "injected" in str(heard[0])


def test_a_caller_cancelled_during_admission_leaves_nothing_generating(served: Any) -> None:
    engine, loop = served

    async def main() -> None:
        running = await engine.add_request("Once upon a time", LONG, "keeps-running")
        await anext(running)
        held = _HeldStep(engine)
        await asyncio.to_thread(held.entered.wait, TIMEOUT_S)
        admitting = asyncio.create_task(engine.add_request("Hello there", LONG, "goes-away"))
        await _until(lambda: "goes-away" in engine._admitting)
        admitting.cancel()
        held.release.set()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        # Outputs of earlier steps may already be waiting in the stream (a fast engine under
        # load coalesces them), so read on until the abort is seen, a bounded number of steps.
        for _ in range(50):
            await anext(running)
            if "goes-away#0" not in engine.core.scheduler.requests:
                break
        assert "goes-away#0" not in engine.core.scheduler.requests
        await running.aclose()
        await _until(lambda: _idle(engine))

    loop.run(main())
    engine.core.scheduler.check_no_leaks()


def test_a_slow_reader_gets_coalesced_outputs(served: Any) -> None:
    engine, loop = served
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def main() -> None:
        stream = await engine.add_request("Once upon a time", params, "slow-ok")
        await _until(lambda: stream._closed)  # finished in the core while nobody read
        outputs = [output async for output in stream]
        assert len(outputs) == 1 and outputs[0].finished
        completion = outputs[0].outputs[0]
        assert len(completion.delta_token_ids) == 12 and completion.token_ids
        assert completion.delta_token_ids == completion.token_ids
        assert completion.delta_text == completion.text
        await _until(lambda: _idle(engine))

    loop.run(main())


def test_a_reader_too_far_behind_is_aborted_with_a_clear_error(served: Any) -> None:
    engine, loop = served  # max_unread_tokens=16

    async def main() -> None:
        stream = await engine.add_request("Once upon a time", LONG, "slow-too-slow")
        await _until(lambda: stream._closed)
        with pytest.raises(SlowReaderError, match="max_unread_tokens=16"):
            async for _ in stream:
                pass
        await _until(lambda: _idle(engine))  # its KV blocks are free again
        assert not engine._streams

    loop.run(main())
    engine.core.scheduler.check_no_leaks()
