"""One Ray Serve replica = one ``AsyncLLM`` behind tokenmill's own FastAPI app.

The replica builds the app with ``create_app`` (every endpoint, error, metric and the engine's
life cycle exactly as ``tokenmill serve``) and runs its lifespan in-process; the ingress hands it
each HTTP request as plain data (``ForwardedRequest``) through a ``DeploymentHandle`` and reads the
answer back as a stream: first ``{"status", "headers"}``, then body chunks. The answer's head is
held back until the first body chunk, so "the response has started" means bytes reached the
client, which is what lets the ingress retry a request whose replica died before that.

The replica also reports, for the router, its step times and utilization
(``record_routing_stats``) and, for Ray's health checks, whether its engine is alive
(``check_health``: a dead engine makes Ray replace the replica), and answers the routers'
straggler-recovery probes (``probe``). Fault injection comes in as the
deployment's ``user_config`` (``reconfigure``). (A declarative ``serve deploy`` changing only it
reconfigures running replicas; each Python ``serve.run`` in Ray 2.60 replaces them anyway.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any, TypedDict

from tokenmill.distributed.ray_serve_config import FaultSettings
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.engine.fault_injection import StepFaultInjector
from tokenmill.routing_policy import PROBE_MAX_TOKENS, PROBE_PROMPT
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.app import create_app
from tokenmill.server.state import ServerSettings, ServerState

logger = logging.getLogger("tokenmill.ray_serve")

REPLICA_HEADER = "x-tokenmill-replica"
"""Response header naming the replica (its Ray actor name) that answered."""
PREFIX_HITS_HEADER = "x-tokenmill-prefix-cache-hits"
"""Response header: the replica's cumulative prefix-cache hits (tokens) when the answer began."""


class ForwardedRequest(TypedDict):
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    routing_key: str
    """Read by the request router (prefix affinity); empty for no affinity."""


class TokenmillReplica:
    """The deployment class (``ray_serve.build_application`` wraps it with ``serve.deployment``)."""

    async def __init__(self, settings: ServerSettings) -> None:
        import ray
        from ray import serve

        context = serve.get_replica_context()
        self.rank = getattr(getattr(context, "rank", None), "rank", None)
        self.name = ray.get_runtime_context().get_actor_name() or context.replica_tag
        # Off until ``reconfigure`` says otherwise; a live object, so a user_config change that
        # reaches a running replica (Ray calls ``reconfigure`` again) takes effect at once.
        self.step_faults = StepFaultInjector()
        self.app = create_app(settings, engine_factory=functools.partial(
            AsyncLLM, step_faults=self.step_faults))
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        state: ServerState = self.app.state.server
        while state.phase == "loading":  # the app loads the engine in a worker thread
            await asyncio.sleep(0.05)
        if state.load_error is not None:
            raise state.load_error
        self._seq = 0
        self._num_probes = 0

    # ------------------------------------------------------------------ Ray Serve hooks
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The deployment's ``user_config``: the fault-injection settings (``FaultSettings``)."""
        faults = FaultSettings.from_user_config(user_config)
        on = faults.applies_to(self.rank)
        checked = StepFaultInjector(faults.step_delay_factor if on else 1.0,
                                    faults.failure_rate if on else 0.0)  # validates
        self.step_faults.delay_factor = checked.delay_factor
        self.step_faults.failure_rate = checked.failure_rate
        if checked.is_active:
            logger.warning("replica %s (rank %s): fault injection on (step delay x%.2f, failure "
                           "rate %.3f)", self.name, self.rank, checked.delay_factor,
                           checked.failure_rate)

    def check_health(self) -> None:
        self.app.state.server.require_ready()  # raises when the engine died or is draining

    def record_routing_stats(self) -> dict[str, Any]:
        state: ServerState = self.app.state.server
        engine = state.engine
        self._seq += 1
        if engine is None:
            return {"name": self.name, "rank": self.rank, "seq": self._seq}
        use = engine.step_meter.snapshot()
        stats = engine.get_stats()
        return {
            "name": self.name, "rank": self.rank, "seq": self._seq,
            "step_seconds_by_bucket": use.step_seconds_by_bucket,
            "mean_step_seconds": use.mean_step_seconds, "tokens_per_s": use.tokens_per_s,
            "mean_batch_size": use.mean_batch_size, "busy_fraction": use.busy_fraction,
            "kv_cache_usage": stats.kv_cache_usage, "num_running": stats.num_running,
            "num_waiting": stats.num_waiting, "num_steps": stats.num_steps,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "prefix_cache_queries": stats.prefix_cache_queries,
        }

    async def probe(self, request: dict[str, Any]) -> int:
        """A straggler-recovery probe (``ray_serve_probes``): ``PROBE_MAX_TOKENS`` greedy tokens
        run straight on the engine, not through the HTTP app, so no request metric counts it;
        its request id (``straggler-probe-N``) names it in the engine's traces. Returns the
        tokens generated (0: no engine)."""
        engine = self.app.state.server.engine
        if engine is None:
            return 0
        self._num_probes += 1
        params = SamplingParams(max_tokens=PROBE_MAX_TOKENS, temperature=0.0, ignore_eos=True)
        num_tokens = 0
        async for output in engine.generate(PROBE_PROMPT, params,
                                            request_id=f"straggler-probe-{self._num_probes}"):
            num_tokens += sum(len(c.delta_token_ids) for c in output.outputs)
        return num_tokens

    # ------------------------------------------------------------------ requests
    async def handle(self, request: ForwardedRequest) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run one HTTP request through the app; yields the head, then body chunks."""
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await disconnected.wait()  # the caller went away (or the answer is complete)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await messages.put(message)

        task = asyncio.create_task(self.app(_scope(request), receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        head: dict[str, Any] | None = None
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    head = self._head(message)
                    continue
                chunk = message.get("body", b"")
                if head is not None and (chunk or not message.get("more_body", False)):
                    yield head
                    head = None
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
            if head is not None:
                yield head
            if task.done() and task.exception() is not None:
                raise task.exception()
        finally:
            disconnected.set()  # a streaming endpoint sees the disconnect and aborts
            if not task.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5.0)

    def _head(self, message: dict[str, Any]) -> dict[str, Any]:
        engine = self.app.state.server.engine
        hits = engine.get_stats().prefix_cache_hits if engine is not None else 0
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
        headers += [(REPLICA_HEADER, self.name), (PREFIX_HITS_HEADER, str(hits))]
        return {"status": message["status"], "headers": headers}


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": request["method"], "scheme": "http",
            "path": request["path"], "raw_path": request["path"].encode(),
            "query_string": request["query_string"], "root_path": "",
            "headers": request["headers"], "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0), "state": {}}
