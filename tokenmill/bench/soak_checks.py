"""The soak's proof that the server came back clean: idle, every KV block free, memory back down.

Everything is read from the server's own figures, as an operator would: ``GET /metrics``
(``tokenmill:num_requests_running``, ``..._waiting``, ``kv_cache_usage_perc``,
``num_kv_cache_blocks``) and the latest point of ``GET /dashboard/data`` (``num_running``,
``num_waiting``, ``kv_cache_usage``, sampled about once a second), which must agree. Resident memory
(RSS) is read from the server process by pid (psutil), so it needs a server on this machine.

Blocks "in use" are blocks some request holds a reference to; blocks that are free but keep their
KV for the prefix cache count as free (they are reused on demand), so an idle server reports 0.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.bench.soak import SoakTally

P = "tokenmill:"


@dataclass(frozen=True)
class ServerState:
    """What the server says about itself at one moment."""

    num_running: float
    num_waiting: float
    kv_cache_usage: float
    num_kv_blocks: float
    dashboard_running: float | None
    dashboard_waiting: float | None
    dashboard_kv_usage: float | None
    finished_by_reason: dict[str, float] = field(default_factory=dict)

    @property
    def num_blocks_in_use(self) -> int:
        return round(self.kv_cache_usage * self.num_kv_blocks)

    @property
    def is_idle(self) -> bool:
        return (self.num_running == 0 and self.num_waiting == 0 and self.kv_cache_usage == 0
                and self.dashboard_running == 0 and self.dashboard_waiting == 0
                and self.dashboard_kv_usage == 0)


async def read_state(client: httpx.AsyncClient, since: int = 0) -> tuple[ServerState, int]:
    """The server's state and the dashboard's latest_seq (pass it back, minus one, as ``since``
    to fetch only the latest point next time)."""
    metrics = await client.get("/metrics")
    metrics.raise_for_status()
    values: dict[str, float] = {}
    finished: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.text):
        for sample in family.samples:
            if sample.name == P + "request_success_total":
                reason = sample.labels.get("finished_reason", "")
                finished[reason] = finished.get(reason, 0.0) + sample.value
            else:
                values[sample.name] = sample.value
    dashboard = await client.get("/dashboard/data", params={"since": str(max(since, 0))})
    dashboard.raise_for_status()
    data = dashboard.json()
    points = data.get("points") or [{}]
    latest: dict[str, Any] = points[-1]
    return ServerState(
        num_running=values.get(P + "num_requests_running", -1.0),
        num_waiting=values.get(P + "num_requests_waiting", -1.0),
        kv_cache_usage=values.get(P + "kv_cache_usage_perc", -1.0),
        num_kv_blocks=values.get(P + "num_kv_cache_blocks", 0.0),
        dashboard_running=latest.get("num_running"),
        dashboard_waiting=latest.get("num_waiting"),
        dashboard_kv_usage=latest.get("kv_cache_usage"),
        finished_by_reason=finished), int(data.get("latest_seq") or 0)


async def wait_idle(base_url: str, deadline_s: float = 60.0) -> tuple[ServerState, float]:
    """Poll until the server reports itself idle or the deadline passes; (last state, seconds)."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        since = 0
        while True:
            state, latest_seq = await read_state(client, since)
            since = latest_seq - 1
            waited = time.monotonic() - start
            if state.is_idle or waited > deadline_s:
                return state, waited
            await asyncio.sleep(0.2)


class RssMonitor:
    """Samples a process's resident memory; ``peak`` is the largest value seen."""

    def __init__(self, pid: int, interval_s: float = 0.25):
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._task: asyncio.Task | None = None

    def read(self) -> int:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss

    async def _run(self) -> None:
        while True:
            self.read()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.0f} MiB"


def final_checks(tally: SoakTally, state: ServerState, *, rss_baseline: int | None = None,
                 rss_final: int | None = None, rss_margin: float = 0.15) -> list[Check]:
    """Every check the soak must pass; RSS is checked only when both readings exist."""
    o = tally.outcomes
    checks = [
        Check("no 5xx", o["server_error_5xx"] == 0, f"{o['server_error_5xx']} answers with 5xx"),
        Check("429s carry Retry-After", tally.num_429_without_retry_after == 0,
              f"{tally.num_429_without_retry_after} of {o['rejected_429']} without it"),
        Check("every request accounted for",
              tally.num_accounted == tally.num_sent and tally.num_unacceptable == 0,
              f"sent {tally.num_sent} = done {o['done']} + 429 {o['rejected_429']} + aborted "
              f"{o['aborted_by_client']} + other {tally.num_unacceptable}"),
        Check("running = waiting = 0", state.num_running == 0 and state.num_waiting == 0
              and state.dashboard_running == 0 and state.dashboard_waiting == 0,
              f"/metrics running {state.num_running:g} waiting {state.num_waiting:g}; "
              f"/dashboard/data running {state.dashboard_running} waiting "
              f"{state.dashboard_waiting}"),
        Check("every KV block free", state.num_blocks_in_use == 0
              and state.dashboard_kv_usage == 0,
              f"{state.num_blocks_in_use} of {state.num_kv_blocks:g} blocks in use "
              f"(usage {state.kv_cache_usage:g}, dashboard {state.dashboard_kv_usage})"),
    ]
    if rss_baseline is not None and rss_final is not None:
        limit = rss_baseline * (1 + rss_margin)
        checks.append(Check(
            f"RSS back within {rss_margin:.0%} of the post-warm-up RSS", rss_final <= limit,
            f"final {mib(rss_final)}, after warm-up {mib(rss_baseline)} "
            f"({rss_final / rss_baseline - 1:+.1%}), limit {mib(int(limit))}"))
    return checks
