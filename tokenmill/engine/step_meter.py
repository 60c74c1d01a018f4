"""How busy one engine is: step times, tokens per second, batch sizes, share of time in steps.

The engine thread records every step (its wall time, the tokens and requests it computed); readers
on other threads (``/metrics``, a Ray replica's routing stats) take a ``snapshot`` over the last
``window_s`` seconds. Step times are also kept per batch bucket (``routing_policy.batch_bucket``)
so replicas can be compared on comparable batches when looking for stragglers.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from tokenmill.routing_policy import batch_bucket


@dataclass(frozen=True)
class StepRecord:
    end: float
    """``time.monotonic()`` when the step ended."""
    seconds: float
    num_tokens: int
    batch_size: int


@dataclass(frozen=True)
class Utilization:
    window_s: float
    """Seconds the figures cover (shorter right after start-up)."""
    num_steps: int
    mean_step_seconds: float
    tokens_per_s: float
    """Tokens computed (prompt chunks + decoded tokens) per second of wall time."""
    mean_batch_size: float
    busy_fraction: float
    """Share of wall time spent in engine steps (forward passes and their scheduling)."""
    step_seconds_by_bucket: dict[int, tuple[float, int]] = field(default_factory=dict)
    """Batch bucket -> (median step seconds, number of steps)."""


class StepMeter:
    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self.started = time.monotonic()
        self._steps: deque[StepRecord] = deque()
        self._lock = threading.Lock()

    def record(self, seconds: float, num_tokens: int, batch_size: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append(StepRecord(now, seconds, num_tokens, batch_size))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0].end < now - self.window_s:
            self._steps.popleft()

    def snapshot(self) -> Utilization:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            steps = list(self._steps)
        span = min(self.window_s, max(now - self.started, 1e-9))
        if not steps:
            return Utilization(span, 0, 0.0, 0.0, 0.0, 0.0)
        by_bucket: dict[int, list[float]] = {}
        for step in steps:
            by_bucket.setdefault(batch_bucket(step.num_tokens), []).append(step.seconds)
        busy = sum(s.seconds for s in steps)
        return Utilization(
            window_s=span, num_steps=len(steps), mean_step_seconds=busy / len(steps),
            tokens_per_s=sum(s.num_tokens for s in steps) / span,
            mean_batch_size=sum(s.batch_size for s in steps) / len(steps),
            busy_fraction=min(1.0, busy / span),
            step_seconds_by_bucket={b: (statistics.median(v), len(v))
                                    for b, v in by_bucket.items()})
