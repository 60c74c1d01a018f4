"""The dashboard's stats history on hand-written engine outputs: rates, percentiles over the window,
the slowest requests, and the bounds (no model needed: the history only reads plain data)."""

from __future__ import annotations

import pytest

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.stats import RequestStats, SchedulerStats
from tokenmill.server.stats_history import StatsHistory, percentile


class EngineStatsSource:
    """What the history reads from AsyncLLM: its name and its latest scheduler stats."""

    model_name = "m"

    def __init__(self) -> None:
        self.stats = SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0,
                                    num_batched_tokens=0, batch_size=0, num_preemptions=0,
                                    prefix_cache_queries=0, prefix_cache_hits=0)

    def get_stats(self) -> SchedulerStats:
        return self.stats


def step(request_id: str, new_tokens: int, *, prompt_len: int = 4,
         finished_at: float | None = None, arrival: float = 0.0, ttft: float = 0.1
         ) -> RequestOutput:
    """One step's output carrying only this step's tokens (a delta)."""
    completion = CompletionOutput(index=0, delta_token_ids=list(range(new_tokens)),
                                  finish_reason="length" if finished_at is not None else None)
    metrics = []
    if finished_at is not None:
        metrics = [RequestStats(arrival_time=arrival, first_token_time=arrival + ttft,
                                last_token_time=finished_at, finished_time=finished_at)]
    return RequestOutput(request_id, None, list(range(prompt_len)), [completion],
                         finished=finished_at is not None, metrics=metrics)


def bound_history(**kwargs) -> tuple[StatsHistory, EngineStatsSource]:
    history = StatsHistory(**kwargs)
    engine = EngineStatsSource()
    history.bind(engine, None)  # type: ignore[arg-type]
    return history, engine


def test_a_point_turns_the_steps_since_the_last_into_rates_and_latencies():
    history, _ = bound_history()
    history.sample(now=100.0)
    history.on_step([step("a", 1, prompt_len=6)], 100.5)
    history.on_step([step("a", 4, finished_at=101.0, arrival=100.0, ttft=0.2)], 101.0)
    point = history.sample(now=102.0)
    assert point["output_tokens_per_s"] == 2.5  # 5 tokens in 2 s
    assert point["prompt_tokens_per_s"] == 3.0  # the prompt counts once
    assert point["requests_finished"] == 1
    assert point["ttft_p50_s"] == point["ttft_p99_s"] == pytest.approx(0.2)
    assert point["tpot_p50_s"] == pytest.approx((101.0 - 100.2) / 4)
    [slowest] = history.snapshot()["slowest_requests"]
    assert (slowest["id"], slowest["generated_tokens"], slowest["e2e_s"]) == ("a", 5, 1.0)
    assert history.sample(now=103.0)["output_tokens_per_s"] == 0.0


def test_latency_percentiles_cover_the_window_only():
    history, _ = bound_history(window_s=10.0)
    for i in range(100):
        history.on_step([step(f"r{i}", 2, finished_at=1000.0, arrival=999.0, ttft=i / 100)],
                        1000.0)
    point = history.sample(now=1001.0)
    assert (point["ttft_p50_s"], point["ttft_p99_s"]) == pytest.approx((0.49, 0.98))
    assert point["window_requests"] == 100
    later = history.sample(now=1011.0)  # all of them finished more than 10 s ago
    assert later["ttft_p50_s"] is None and later["window_requests"] == 0
    # ... but they stay listed as the slowest recent requests
    assert len(history.snapshot()["slowest_requests"]) == 10


def test_slowest_requests_come_slowest_first_and_link_their_trace():
    history, _ = bound_history(num_slowest=3)
    for i, e2e in enumerate([0.5, 3.0, 1.0, 2.0]):
        history.on_step([step(f"r{i}", 2, finished_at=10.0 + e2e, arrival=10.0)], 10.0 + e2e)
    history.sample(now=20.0)
    slowest = history.snapshot()["slowest_requests"]
    assert [r["id"] for r in slowest] == ["r1", "r3", "r2"]
    assert slowest[0]["trace_url"] == "/v1/requests/r1/trace"


def test_history_is_a_ring_buffer_read_from_a_sequence_number():
    history, _ = bound_history(num_points=5)
    for t in range(12):
        history.sample(now=float(t))
    snapshot = history.snapshot()
    assert [p["seq"] for p in snapshot["points"]] == [8, 9, 10, 11, 12]
    assert snapshot["latest_seq"] == 12 and snapshot["max_points"] == 5
    assert [p["seq"] for p in history.snapshot(since=10)["points"]] == [11, 12]
    assert history.snapshot(since=12)["points"] == []


def test_engine_gauges_and_counters_become_figures_per_point():
    history, engine = bound_history(window_s=60.0)
    history.sample(now=0.0)
    engine.stats = SchedulerStats(num_running=3, num_waiting=2, kv_cache_usage=0.25,
                                  num_batched_tokens=0, batch_size=0, num_preemptions=4,
                                  prefix_cache_queries=200, prefix_cache_hits=50)
    point = history.sample(now=1.0)
    assert (point["num_running"], point["num_waiting"], point["kv_cache_usage"]) == (3, 2, 0.25)
    assert (point["preemptions"], point["preemptions_total"]) == (4, 4)
    assert point["prefix_cache_hit_rate"] == 0.25
    assert point["cost_per_million_tokens"] is None  # no --price-per-hour
    assert history.sample(now=2.0)["preemptions"] == 0


def test_nothing_is_sampled_before_the_engine_is_bound():
    history = StatsHistory()
    assert history.sample() is None
    snapshot = history.snapshot()
    assert (snapshot["model"], snapshot["points"], snapshot["latest_seq"]) == (None, [], 0)


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([1.0], 99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
