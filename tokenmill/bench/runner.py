"""Load shapes: a fixed number of requests in flight, or requests arriving at a rate.

Each level appends results to its ``LevelRun`` as they arrive, so whatever stops the run (Ctrl-C,
a dead server, a bug) leaves the finished requests in place for the report to write.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tokenmill.bench.client import RequestResult, Target, send_request
from tokenmill.bench.workload import BenchRequest
from tokenmill.errors import BenchError

ARRIVALS = ("poisson", "constant")


@dataclass(frozen=True)
class LoadLevel:
    mode: str  # "concurrency" or "rate"
    value: float  # requests in flight, or requests per second (inf = all at once)
    arrival: str = "poisson"
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("concurrency", "rate"):
            raise BenchError(f"unknown load mode {self.mode!r}")
        if self.arrival not in ARRIVALS:
            raise BenchError(f"--arrival={self.arrival!r}: choose one of {', '.join(ARRIVALS)}")
        if self.mode == "concurrency" and (self.value < 1 or not float(self.value).is_integer()):
            raise BenchError(f"--concurrency value {self.value:g} must be a whole number >= 1")

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"c={int(self.value)}"
        rate = "inf" if math.isinf(self.value) else f"{self.value:g}"
        return f"rate={rate}/s" + ("" if math.isinf(self.value) else f" {self.arrival}")

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "value": "inf" if math.isinf(self.value) else self.value,
                "arrival": self.arrival, "max_concurrency": self.max_concurrency,
                "label": self.label}


@dataclass
class LevelRun:
    level: LoadLevel
    results: list[RequestResult] = field(default_factory=list)
    start: float = 0.0  # perf_counter at the level's first send
    last_done: float = 0.0  # perf_counter at its latest answer
    complete: bool = False

    @property
    def duration_s(self) -> float:
        return max(0.0, self.last_done - self.start)


@dataclass(frozen=True)
class Stop:
    """When a level ends: after ``num_requests`` requests, or ``duration_s`` seconds of sending."""

    num_requests: int | None = None
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if (self.num_requests is None) == (self.duration_s is None):
            raise BenchError("give exactly one of --num-requests or --duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise BenchError(f"--num-requests={self.num_requests} must be at least 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise BenchError(f"--duration={self.duration_s} must be > 0 seconds")

    def allows(self, index: int, start: float) -> bool:
        if self.num_requests is not None:
            return index < self.num_requests
        return time.perf_counter() - start < (self.duration_s or 0.0)


ResultCallback = Callable[[RequestResult], None]


async def _one(client: httpx.AsyncClient, target: Target, request: BenchRequest,
               run: LevelRun, on_result: ResultCallback) -> None:
    result = await send_request(client, target, request, run.start)
    run.results.append(result)
    run.last_done = time.perf_counter()
    on_result(result)


async def run_level(client: httpx.AsyncClient, target: Target, run: LevelRun,
                    requests: list[BenchRequest], stop: Stop, on_result: ResultCallback,
                    seed: int = 0) -> None:
    level = run.level
    run.start = run.last_done = time.perf_counter()
    counter = itertools.count()
    if level.mode == "concurrency":
        async def worker() -> None:
            while stop.allows(index := next(counter), run.start):
                await _one(client, target, requests[index % len(requests)], run, on_result)

        await asyncio.gather(*(worker() for _ in range(int(level.value))))
    else:
        rng = random.Random(seed)
        limit = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None

        async def limited(request: BenchRequest) -> None:
            if limit is None:
                await _one(client, target, request, run, on_result)
                return
            async with limit:
                await _one(client, target, request, run, on_result)

        tasks: list[asyncio.Task[None]] = []
        send_at = run.start
        try:
            while stop.allows(index := next(counter), run.start):
                delay = send_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival schedule, not a wait for a state
                tasks.append(asyncio.create_task(limited(requests[index % len(requests)])))
                if not math.isinf(level.value):
                    gap = 1.0 / level.value
                    send_at += rng.expovariate(level.value) if level.arrival == "poisson" else gap
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    run.complete = True


async def warm_up(client: httpx.AsyncClient, target: Target, requests: list[BenchRequest],
                  count: int) -> list[RequestResult]:
    """Requests sent one at a time before measuring (first-call compile/alloc costs), not kept."""
    return [await send_request(client, target, requests[i % len(requests)], time.perf_counter())
            for i in range(count)]
