"""How fast the engine is finishing requests, so a refused client is told when to come back.

A 429 for a full waiting queue carries ``Retry-After``: the time the requests already waiting need
to drain at the finish rate measured over the last ``window_seconds`` (requests leaving for any
reason: done, stopped or aborted, since each frees its place). Clamped to
[``MIN_RETRY_SECONDS``, ``MAX_RETRY_SECONDS``]; with nothing finished in the window (the queue is
stuck behind long generations, or the server just started), the maximum.
"""

from __future__ import annotations

import math
from collections import deque

MIN_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0


class DrainRate:
    def __init__(self, window_seconds: float = 30.0):
        self.window_seconds = window_seconds
        self._finish_times: deque[float] = deque()

    def record_finished(self, now: float) -> None:
        self._finish_times.append(now)
        self._expire(now)

    def per_second(self, now: float) -> float:
        """Requests finished per second over the window (0 when none)."""
        self._expire(now)
        if not self._finish_times:
            return 0.0
        # Over the window, or since the first finish if the server is younger than the window.
        span = min(self.window_seconds, max(now - self._finish_times[0], 1.0))
        return len(self._finish_times) / span

    def retry_after_seconds(self, num_waiting: int, now: float) -> float:
        rate = self.per_second(now)
        if rate <= 0:
            return MAX_RETRY_SECONDS
        seconds = math.ceil(num_waiting / rate)
        return min(MAX_RETRY_SECONDS, max(MIN_RETRY_SECONDS, seconds))

    def _expire(self, now: float) -> None:
        horizon = now - self.window_seconds
        while self._finish_times and self._finish_times[0] < horizon:
            self._finish_times.popleft()
