"""``AsyncLLM``: the engine for servers. The engine core runs in its own thread; asyncio callers
submit requests and read per-step outputs without ever blocking a decode step.

Threads and what they own:
* the engine thread owns the ``EngineCore`` (scheduler, KV blocks, the model): it builds it, drains a
  command inbox (add / abort / stop), runs ``step()`` while there is work, and posts raw core outputs
  to the event loop. torch releases the GIL inside its kernels, so HTTP work proceeds during a step.

Why the core is built on the engine thread and not by the caller: with torch's OpenMP backend each
thread that starts a parallel region gets its own pool of worker threads. Loading the model runs
parallel regions, so a core loaded on one thread and stepped on another leaves two pools alive;
libgomp then counts more threads than cores and stops spinning between regions, and every parallel
op pays a futex wake (~75 us on a 2-core machine, 15 -> 28 ms per decode step of the built-in model,
``benchmarks/serve_load.py``). One thread doing all the torch work keeps one pool.
* the event loop owns text: tokenizing, the output processor (detokenizer, stop strings, n-sample
  gathering) and one ``RequestStream`` per request that its HTTP handler reads.

Nobody is ever left waiting: if the engine thread dies (any exception, a model worker process that
died, raised or hung, found by the executor within ``worker_step_timeout`` during a step and
within ``HEALTH_CHECK_SECONDS`` while idle, or a bug in the output processor on the loop), every
request in flight and every request still being admitted fails at once with ``EngineDeadError``, and ``on_dead`` callbacks tell the server (which turns ``/health``
503 and exits, or restarts the engine). A request whose caller goes away while it is being admitted
is aborted in the core right after its admission, so it never generates for no one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.engine.fault_injection import EngineFaultInjector, StepFaultInjector
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.request import Request
from tokenmill.engine.request_stream import RequestStream
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.engine.stats import SchedulerStats
from tokenmill.engine.step_meter import StepMeter
from tokenmill.engine.trace_store import TraceStore
from tokenmill.errors import EngineDeadError, EngineNotReadyError, TokenmillError
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HEALTH_CHECK_SECONDS = 1.0
"""While idle, the engine thread checks its model workers this often (a dead one kills the
engine, so /health turns 503 without waiting for a request)."""

OutputListener = Callable[[list[RequestOutput], float], None]
DeathListener = Callable[[BaseException], None]


@dataclass
class _Add:
    request_id: str
    children: list[Request]
    admitted: asyncio.Future


@dataclass
class _Finish:
    child_ids: list[str]
    stopped: bool = False  # True: a stop string ended them; False: aborted


class AsyncLLM:
    def __init__(self, config: EngineConfig, step_faults: StepFaultInjector | None = None):
        self.config = config
        self.step_meter = StepMeter()
        """Step times, tokens/s, batch sizes and busy share (``/metrics``, stragglers)."""
        self._step_faults = step_faults or StepFaultInjector()
        self._inbox: queue.SimpleQueue[_Add | _Finish | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._unreported_death: BaseException | None = None
        self._death_reported = False
        """The engine died before an event loop was bound: reported once one is."""
        self._dead: BaseException | None = None
        self._faults = EngineFaultInjector.from_env()
        self._thread = threading.Thread(target=self._engine_main, name="tokenmill-engine",
                                        daemon=True)
        self._core_ready = threading.Event()
        self._frontend_ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread.start()
        self._core_ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        try:
            self.core: EngineCore = self._core
            self.tokenizer = self.core.source.tokenizer
            self.model_name = config.model.served_model_name or self.core.source.name
            self.max_model_len = self.core.max_model_len
            self.input_processor = InputProcessor(self.tokenizer,
                                                  self.core.source.arch.vocab_size)
            self.output_processor = OutputProcessor(self.tokenizer)
            self.output_listeners: list[OutputListener] = []
            self.death_listeners: list[DeathListener] = []
            """Called on the event loop, once, if the engine dies (the server exits or restarts)."""
            self._streams: dict[str, RequestStream] = {}
            self._admitting: dict[str, asyncio.Future] = {}  # request id -> admission answer
            self._stats: SchedulerStats = self.core.get_stats()
            self._accepting = True
            self._ids = itertools.count()
            self.traces = TraceStore(enabled=config.scheduler.request_trace)  # request traces
        except BaseException:
            self._inbox.put(None)  # the engine thread stops instead of waiting for us forever
            raise
        finally:
            self._frontend_ready.set()

    # ----------------------------------------------------------------- public API
    @property
    def is_running(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def dead_error(self) -> BaseException | None:
        """What killed the engine thread, if it died."""
        return self._dead

    def get_stats(self) -> SchedulerStats:
        """A snapshot taken after the latest step (never blocks on the engine)."""
        return self._stats

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None, cache_salt: str | None = None,
                          arrival_time: float | None = None, pooling: str | None = None,
                          priority: int = 0) -> RequestStream:
        """Validate and admit a request; raises (400 / 429 / 503 errors) before anything streams.

        ``pooling`` ("last" or "mean") makes it an embedding request: it goes through the same
        admission and batches as generation, samples nothing, and its one output carries
        ``embedding``. ``priority``: lower is more urgent, default 0 (vLLM's convention; see
        docs/scheduling.md)."""
        self._check_accepting()
        loop = self.bind_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        text, prompt_ids = self.input_processor.tokenize_prompt(prompt)
        grammar = None
        if params.structured_output is not None:
            # compiled on a worker thread (cached): neither the loop nor the engine waits for it
            grammar = await self.input_processor.grammars.compile_async(params.structured_output)
            self._check_accepting()  # the engine may have died or begun shutting down meanwhile
        children = self.input_processor.make_requests(request_id, prompt_ids, params, cache_salt,
                                                      arrival_time, grammar=grammar,
                                                      pooling=pooling, priority=priority)
        admitted = loop.create_future()
        stream = RequestStream(request_id, len(prompt_ids),
                               self.config.scheduler.max_unread_tokens, self.abort)
        self._streams[request_id] = stream
        self._admitting[request_id] = admitted
        self.output_processor.add_request(request_id, text, children)
        self.traces.add(request_id, children)  # request traces (before its outputs can come)
        self._inbox.put(_Add(request_id, children, admitted))
        try:
            await admitted
        except BaseException:
            # Refused, the engine died, or the caller went away (cancelled) while the engine
            # thread may be adding the request right now: abort it after the add, in inbox order,
            # so it never keeps generating and holding KV blocks for no one.
            self.traces.discard(request_id)  # request traces
            self._abort_in_core(request_id, [c.request_id for c in children])
            raise
        finally:
            self._admitting.pop(request_id, None)
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None, cache_salt: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(prompt, params, request_id, cache_salt,
                                        priority=priority)
        try:
            async for output in stream:
                yield output
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        if request_id in self._streams:
            self._abort_in_core(request_id, self.output_processor.child_ids(request_id))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Take no new requests, let running ones finish within ``timeout`` s, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.is_running:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            stream = self._streams.get(request_id)
            await self.abort(request_id)
            if stream is not None:
                stream.fail(EngineNotReadyError("the server shut down before this request "
                                                "finished"))
        self._inbox.put(None)
        self.input_processor.grammars.close()
        await asyncio.to_thread(self._thread.join, 10)

    # ----------------------------------------------------------------- event-loop side
    def bind_loop(self) -> asyncio.AbstractEventLoop:
        """Bind to the running event loop. The first request does it; a server calls it as soon
        as the engine is up, so that a death before any request (a model worker found dead while
        idle) still fails fast and reaches ``death_listeners``."""
        loop = asyncio.get_running_loop()
        with self._loop_lock:
            if self._loop is None:
                self._loop = loop
            elif self._loop is not loop:
                raise RuntimeError("AsyncLLM is bound to another event loop")
            death, self._unreported_death = self._unreported_death, None
        if death is not None:
            loop.call_soon(self._on_engine_dead, death)
        return loop

    def _check_accepting(self) -> None:
        self._check_alive()
        if not self._accepting:
            raise EngineNotReadyError("the server is shutting down and takes no new requests")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an internal error: {self._dead!r}")

    def _abort_in_core(self, request_id: str, child_ids: list[str]) -> None:
        """The frontend forgets the request now; the core frees its blocks at its next command."""
        self._forget(request_id)
        self._inbox.put(_Finish(child_ids))

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.output_processor.abort(request_id)
        self.traces.finish(request_id)  # request traces

    def _on_core_outputs(self, core_outputs: list[EngineCoreOutput]) -> None:
        if self._dead is not None:
            return
        now = time.time()
        try:
            processed = self.output_processor.process(core_outputs)
        except Exception as error:  # a frontend bug: nobody's output can be trusted any more
            logger.exception("the output processor failed")
            self._inbox.put(None)  # stop the engine thread too
            self._on_engine_dead(error)
            return
        if processed.stopped_request_ids:
            self._inbox.put(_Finish(processed.stopped_request_ids, stopped=True))
        for output in processed.request_outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None and not stream.put(output):  # the reader fell too far behind
                self._abort_in_core(output.request_id,
                                    self.output_processor.child_ids(output.request_id))
                continue
            if output.finished:
                self._streams.pop(output.request_id, None)
                self.traces.finish(output.request_id)  # request traces
        for listener in self.output_listeners:
            try:
                listener(processed.request_outputs, now)
            except Exception:  # a metrics bug must never take requests down
                logger.exception("output listener failed")

    def _on_engine_dead(self, error: BaseException) -> None:
        if self._death_reported:
            return
        self._death_reported = True
        self._dead = error
        dead = EngineDeadError(f"the engine stopped after an internal error: {error!r}")
        for stream in self._streams.values():
            stream.fail(dead)
        for admitted in self._admitting.values():
            if not admitted.done():
                admitted.set_exception(dead)
        self._streams.clear()
        self.traces.finish_all()  # request traces
        for listener in self.death_listeners:
            try:
                listener(error)
            except Exception:
                logger.exception("engine death listener failed")

    # ----------------------------------------------------------------- engine thread
    def _engine_main(self) -> None:
        """Build the core here (see the module docstring), then serve commands until told to stop."""
        try:
            self._core = EngineCore(self.config)
        except BaseException as error:  # noqa: BLE001 - re-raised by __init__ on the caller's thread
            self._load_error = error
            self._core_ready.set()
            return
        self._core_ready.set()
        self._frontend_ready.wait()  # until __init__ has finished setting up the frontend side
        self._engine_loop()

    def _engine_loop(self) -> None:
        try:
            self._run_engine_loop()
        except BaseException as error:
            logger.exception("engine loop died")
            with self._loop_lock:
                loop = self._loop
                if loop is None:
                    self._unreported_death = error
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._on_engine_dead, error)
            else:
                self._dead = error
        finally:
            try:
                self.core.shutdown()  # worker processes end with the engine, dead or not
            except Exception:
                logger.exception("stopping the model workers failed")

    def _run_engine_loop(self) -> None:
        while True:
            # Block for commands only when idle; otherwise take what arrived and step.
            block = not self.core.has_unfinished_requests()
            if not self._apply_commands(block):
                return
            self._stats = self.core.get_stats()  # aborts change it even without a step
            if not self.core.has_unfinished_requests():
                continue
            self._faults.before_step()
            started = time.perf_counter()
            self._step_faults.before_step()
            outputs = self.core.step()
            self._step_faults.after_step(time.perf_counter() - started)
            self._stats = self.core.get_stats()
            if self._stats.num_batched_tokens:  # an empty step says nothing about speed
                self.step_meter.record(time.perf_counter() - started,
                                       self._stats.num_batched_tokens, self._stats.batch_size)
            if outputs and self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_core_outputs, outputs)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands; False when asked to stop. Idle (``block``), it waits for one,
        checking the model workers' health every ``HEALTH_CHECK_SECONDS``."""
        while True:
            try:
                command = (self._inbox.get(timeout=HEALTH_CHECK_SECONDS) if block
                           else self._inbox.get_nowait())
                break
            except queue.Empty:
                if not block:
                    return True
            self.core.check_health()
        while True:
            if command is None:
                return False
            if isinstance(command, _Add):
                self._admit(command)
            elif command.stopped:
                self.core.stop_requests(command.child_ids)
            else:
                self.core.abort_requests(command.child_ids)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _admit(self, command: _Add) -> None:
        added: list[str] = []
        error: BaseException | None = None
        try:
            for child in command.children:
                self.core.add_request(child)
                added.append(child.request_id)
        except TokenmillError as exc:
            error = exc
            if added:
                self.core.abort_requests(added)
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(_resolve, command.admitted, error)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def engine_info(engine: AsyncLLM) -> dict[str, Any]:
    """What the start-up banner and /v1/models report about the running engine."""
    spec = engine.core.kv_spec
    return {
        "model": engine.model_name,
        "path": str(engine.core.source.path),
        "dtype": engine.config.model.resolved_dtype(),
        "weights": engine.core.executor.weights,
        "device": engine.config.model.device,
        "max_model_len": engine.max_model_len,
        "kv_blocks": spec.num_blocks,
        "kv_tokens": spec.num_tokens,
        "kv_bytes": spec.num_bytes,
        "tensor_parallel_size": len(engine.core.executor.weight_bytes),
        "weight_bytes_per_rank": max(engine.core.executor.weight_bytes),
        "allreduce": engine.core.executor.allreduce,
    }
