"""The live cost figures against a bill worked out by hand on a clock the test drives."""

from __future__ import annotations

import pytest

from tokenmill.server.cost_metrics import CostTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_kind_of_token_is_charged_the_whole_window() -> None:
    clock = Clock()
    tracker = CostTracker(3.6, window_seconds=60.0, clock=clock)  # $0.001 a second
    clock.now += 10
    tracker.record(prefill=1000, decode=500, cached=250)
    clock.now += 10
    # 20 s of uptime (younger than the window) cost $0.02, whatever was served
    assert tracker.dollars_total() == pytest.approx(0.02)
    # $0.02 over 1000 prefill tokens is $20 a million; over 500 decode tokens $40; over 250
    # cached prompt tokens $80; over all 1750 tokens $11.43
    assert tracker.per_million() == pytest.approx(
        {"prefill": 20.0, "decode": 40.0, "cached_prompt": 80.0, "all": 0.02 / 1750 * 1e6})

    clock.now += 51  # 71 s old: the window is the last 60 s; the first tokens are 61 s old
    tracker.record(decode=300)
    assert tracker.dollars_total() == pytest.approx(0.071)
    assert tracker.per_million() == pytest.approx(
        {"prefill": None, "decode": 0.06 / 300 * 1e6, "cached_prompt": None,
         "all": 0.06 / 300 * 1e6})
