"""Engine statistics: a timeline and counts per request, a snapshot per step."""

from __future__ import annotations

from typing import Any

from tokenmill import SamplingParams
from tokenmill.engine.stats import RequestStats

CHUNK = 16


def test_request_stats_form_a_timeline(llm: Any, driver: Any) -> None:
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, n=2, seed=1)
    (request_id,) = driver.add(llm, ["Tell me about the ocean."], params, prefix="stats")
    run = driver.SteppedRun()
    seen_unfinished = False
    while llm.engine.has_unfinished_requests():
        for output in driver.step(llm, run):
            if not output.finished:
                assert output.metrics == [], "metrics come with the finished output"
                seen_unfinished = True
    assert seen_unfinished
    output = run.final[request_id]
    assert len(output.metrics) == 2  # one per sample
    for stats in output.metrics:
        assert isinstance(stats, RequestStats)
        assert (stats.arrival_time <= stats.queued_time <= stats.first_scheduled_time
                <= stats.first_token_time <= stats.last_token_time <= stats.finished_time)
        assert stats.num_preemptions == 0
        assert stats.time_to_first_token >= 0 and stats.queue_seconds >= 0
        assert stats.e2e_seconds >= stats.time_to_first_token


def test_cached_tokens_are_reported_per_request(llm: Any) -> None:
    prompt = " ".join(f"fact {i}." for i in range(20))  # > 3 full blocks
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate([prompt], params, use_tqdm=False, cache_salt="cached-stats")[0]
    second = llm.generate([prompt], params, use_tqdm=False, cache_salt="cached-stats")[0]
    assert first.num_cached_tokens == 0
    block_size = llm.engine.scheduler.block_manager.block_size
    assert second.num_cached_tokens == (len(second.prompt_token_ids) - 1) // block_size * block_size


def test_step_stats_follow_the_schedule(make_llm: Any, driver: Any) -> None:
    llm = make_llm(enable_prefix_caching=True, max_num_batched_tokens=CHUNK)
    prompts = [[2000 + i for i in range(40)], [3000 + i for i in range(40)]]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    before = llm.engine.get_stats()
    driver.add(llm, prompts, params, prefix="step-stats", cache_salt="step-stats")
    run = driver.SteppedRun()
    driver.step(llm, run)
    stats = llm.engine.get_stats()
    assert stats.num_steps == before.num_steps + 1
    assert (stats.num_batched_tokens, stats.batch_size) == (CHUNK, 1)
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert stats.num_free_blocks == stats.num_total_blocks - 1
    assert stats.kv_cache_usage == 1 / stats.num_total_blocks

    usages = [stats.kv_cache_usage]
    while llm.engine.has_unfinished_requests():
        driver.step(llm, run)
        stats = llm.engine.get_stats()
        assert stats.num_batched_tokens <= CHUNK and stats.batch_size <= 2
        usages.append(stats.kv_cache_usage)
    # Every prompt token once, then one token per decode step (the last sample is not run).
    assert sum(run.num_batched_tokens) == 2 * 40 + 2 * (3 - 1)
    assert max(usages) > usages[0]
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert stats.num_free_blocks == stats.num_total_blocks
