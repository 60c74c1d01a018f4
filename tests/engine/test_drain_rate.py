"""Retry-After for a full waiting queue comes from the measured finish rate, within 1..60 s."""

from __future__ import annotations

from tokenmill.engine.drain_rate import MAX_RETRY_SECONDS, MIN_RETRY_SECONDS, DrainRate


def test_retry_after_is_the_time_to_drain_the_queue_at_the_measured_rate() -> None:
    rate = DrainRate(window_seconds=10)
    for i in range(20):  # 2 requests per second for 10 s
        rate.record_finished(100 + i * 0.5)
    assert abs(rate.per_second(110) - 2.0) < 0.11
    assert rate.retry_after_seconds(num_waiting=30, now=110) == 15


def test_retry_after_is_clamped_and_old_finishes_expire() -> None:
    rate = DrainRate(window_seconds=10)
    assert rate.retry_after_seconds(5, now=0) == MAX_RETRY_SECONDS  # nothing measured yet
    for i in range(100):
        rate.record_finished(50 + i * 0.01)
    assert rate.retry_after_seconds(1, now=51) == MIN_RETRY_SECONDS
    assert rate.retry_after_seconds(10_000, now=51) == MAX_RETRY_SECONDS
    assert rate.per_second(now=100) == 0.0  # the window moved past every finish
