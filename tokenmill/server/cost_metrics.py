"""Live cost metrics: what the machine's hourly price means per million tokens, right now.

The machine costs the same busy or idle, so ``tokenmill:cost_dollars_total`` grows with uptime, and
the cost of a million tokens over the last window is that window's cost divided by the tokens served
in it. The figure is given per kind of token — prefill (prompt tokens computed), decode (generated)
and cached prompt tokens (taken from the prefix cache) — each charging the whole window to that kind,
the same convention as ``tokenmill bench --price-per-hour`` (``tokenmill/cost.py``): views of
one bill, not parts to add up.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.cost import Price, hourly_price, level_cost


@dataclass
class _Sample:
    time: float
    prefill: int
    decode: int
    cached: int


class CostTracker:
    def __init__(self, price_per_hour: float, window_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.price: Price = hourly_price(price_per_hour)  # validates: finite and >= 0
        self.window_seconds = window_seconds
        self.clock = clock
        self.started = clock()
        self._samples: deque[_Sample] = deque()

    def record(self, *, prefill: int = 0, decode: int = 0, cached: int = 0) -> None:
        if prefill or decode or cached:
            self._samples.append(_Sample(self.clock(), prefill, decode, cached))

    def dollars_total(self) -> float:
        return self.price.per_hour / 3600.0 * (self.clock() - self.started)

    def per_million(self) -> dict[str, float | None]:
        """$ per 1M tokens of each kind over the window (None when none were served in it)."""
        now = self.clock()
        while self._samples and self._samples[0].time < now - self.window_seconds:
            self._samples.popleft()
        # A server younger than the window has only been paid for since it started.
        seconds = max(min(self.window_seconds, now - self.started), 1e-9)
        prefill = sum(s.prefill for s in self._samples)
        decode = sum(s.decode for s in self._samples)
        cached = sum(s.cached for s in self._samples)
        served = level_cost({"output_tokens_per_s": decode / seconds,
                             "input_tokens_per_s": prefill / seconds}, self.price)
        from_cache = level_cost({"output_tokens_per_s": cached / seconds,
                                 "input_tokens_per_s": (prefill + decode + cached) / seconds},
                                self.price)
        return {"prefill": served["dollars_per_million_input_tokens"],
                "decode": served["dollars_per_million_output_tokens"],
                "cached_prompt": from_cache["dollars_per_million_output_tokens"],
                "all": from_cache["dollars_per_million_input_tokens"]}
