"""Request traces without a model: the scheduler's own timeline of each request, checked against
what the pool arithmetic says must have happened (hand-written runner outputs, a fake clock)."""

from __future__ import annotations

import pytest

from tests.engine.test_scheduler import make_request, runner_output
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.trace import (
    BATCH_FULL,
    KV_BLOCKS_SHORT,
    MAX_WAITS_PER_EPISODE,
    PREEMPTING,
    WaitCause,
)
from tokenmill.engine.trace_report import describe, snapshot, summarize
from tokenmill.engine.trace_store import TraceStore

STEP_SECONDS = 0.01


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(clock: FakeClock, *, num_blocks: int = 16, max_num_seqs: int = 16,
                   max_num_batched_tokens: int = 512, trace: bool = True,
                   prefix_caching: bool = False) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                     max_num_seqs=max_num_seqs, request_trace=trace),
                     CacheConfig(block_size=16, enable_prefix_caching=prefix_caching),
                     num_blocks=num_blocks, max_model_len=1024, clock=clock)


def add(scheduler: Scheduler, clock: FakeClock, name: str, prompt: int | list[int],
        **params: object) -> Request:
    params.setdefault("ignore_eos", True)
    request = make_request(name, prompt, **params)
    request.stats.arrival_time = clock.now
    scheduler.add_request(request)
    return request


def run(scheduler: Scheduler, clock: FakeClock, max_steps: int | None = None) -> None:
    num_steps = 0
    while scheduler.has_unfinished_requests() and (max_steps is None or num_steps < max_steps):
        out = scheduler.schedule()
        clock.now += STEP_SECONDS
        scheduler.update_from_output(out, runner_output(scheduler, out))
        num_steps += 1


def events_of(request: Request, clock: FakeClock, kind: str | None = None) -> list[dict]:
    assert request.trace is not None
    events = [describe(e, request.request_id) for e in snapshot(request.trace, clock.now)]
    return [e for e in events if kind is None or e["event"] == kind]


def test_queued_behind_a_full_kv_pool_and_preempted_says_so_with_the_numbers() -> None:
    """16 blocks of 16 tokens; three 100-token prompts (7 blocks each) that grow to 159 tokens
    (10 blocks). A and B fit (14 blocks, 2 free); C needs 7 and waits. When A needs its 9th
    block none is free, so B (the youngest) is preempted with its 128 computed tokens and waits
    at the head of the queue, in front of C."""
    clock = FakeClock()
    scheduler = make_scheduler(clock)
    a, b, c = (add(scheduler, clock, name, 100, max_tokens=60) for name in "ABC")
    run(scheduler, clock)
    scheduler.check_no_leaks()

    c_waits = events_of(c, clock, "wait")
    first = c_waits[0]
    assert (first["reason"], first["blocks_needed"], first["num_requests_ahead"]) == (
        KV_BLOCKS_SHORT, 7, 0)
    assert first["t"] == 0.0 and first["num_steps"] == 29  # from step 0 until B's preemption
    assert "KV blocks short (needed 7, free 0)" in first["text"]

    [preempted] = events_of(b, clock, "preempted")
    assert preempted["by_request_id"] == "A"
    assert (preempted["blocks_needed"], preempted["blocks_free"]) == (1, 0)
    assert preempted["num_tokens_dropped"] == 128  # 100 prompt + 28 generated tokens
    assert preempted["text"].startswith("preempted: older request A needed 1 more KV block "
                                        "with 0 free; 128 computed tokens dropped")
    b_waits = events_of(b, clock, "wait")
    assert [w["reason"] for w in b_waits] == [PREEMPTING, KV_BLOCKS_SHORT]
    # to recompute 100 + 29 tokens B needs 9 blocks; A holds 10 of the 16
    assert (b_waits[1]["blocks_needed"], b_waits[1]["blocks_free"]) == (9, 6)
    assert b_waits[1]["num_requests_ahead"] == 0
    [resumed] = events_of(b, clock, "resumed")
    recompute = events_of(b, clock, "prefill")[-1]
    assert recompute["t"] == resumed["t"] and recompute["num_tokens"] == 129

    # behind B, C waited with 1 request ahead; then it ran and was itself preempted once
    assert c_waits[2]["num_requests_ahead"] == 1 and c_waits[2]["blocks_needed"] == 9
    [c_preempted] = events_of(c, clock, "preempted")
    assert c_preempted["text"].startswith("preempted: it was the youngest running request")
    assert summarize(snapshot(c.trace, clock.now)) == (
        "queued 0.8 s: KV full behind 1 request; preempted once")
    assert summarize(snapshot(b.trace, clock.now)) == (
        "queued 0.3 s: KV full (needed 9 blocks, 6 free); preempted once")
    assert summarize(snapshot(a.trace, clock.now)) == "not queued"
    for request in (a, b, c):
        assert events_of(request, clock)[-1]["text"] == "finished (length) after 60 output tokens"


def test_a_long_wait_is_one_event_with_its_step_count() -> None:
    clock = FakeClock()
    scheduler = make_scheduler(clock, num_blocks=64, max_num_seqs=1)
    first = add(scheduler, clock, "first", 10, max_tokens=40)
    second = add(scheduler, clock, "second", 10, max_tokens=2)
    run(scheduler, clock)
    [wait] = events_of(second, clock, "wait")
    assert wait["reason"] == BATCH_FULL and wait["max_num_seqs"] == 1
    assert wait["num_steps"] == 40  # every step of `first`, in one event
    assert wait["seconds"] == pytest.approx(40 * STEP_SECONDS)
    assert wait["text"] == "waited 40 steps (0.400 s): batch full (1 request running)"
    assert [e["event"] for e in events_of(first, clock)] == [
        "queued", "admitted", "prefill", "first_token", "finished"]  # decode steps: none


def test_a_wait_in_progress_is_visible_and_an_abort_closes_it() -> None:
    clock = FakeClock()
    scheduler = make_scheduler(clock, num_blocks=64, max_num_seqs=1)
    add(scheduler, clock, "busy", 10, max_tokens=50)
    waiting = add(scheduler, clock, "waiting", 10)
    run(scheduler, clock, max_steps=5)
    [ongoing] = events_of(waiting, clock, "wait")
    assert ongoing["ongoing"] is True and ongoing["num_steps"] == 5
    assert ongoing["text"].startswith("waiting: 5 steps")
    scheduler.finish_requests(["waiting", "busy"])
    [closed] = events_of(waiting, clock, "wait")
    assert "ongoing" not in closed and closed["num_steps"] == 5
    assert events_of(waiting, clock)[-1]["text"] == "finished (abort) after 0 output tokens"
    scheduler.check_no_leaks()


def test_prefix_hit_and_prefill_chunks_are_recorded() -> None:
    clock = FakeClock()
    scheduler = make_scheduler(clock, num_blocks=128, max_num_batched_tokens=64,
                               prefix_caching=True)
    prompt = list(range(500, 700))  # 200 tokens
    add(scheduler, clock, "warm", prompt, max_tokens=1)
    run(scheduler, clock)
    again = add(scheduler, clock, "again", prompt + [7, 8, 9], max_tokens=1)
    run(scheduler, clock)
    [admitted] = events_of(again, clock, "admitted")
    assert admitted["num_cached_tokens"] == 192  # 12 full blocks of the 200 shared tokens
    chunks = [(e["first_position"], e["num_tokens"]) for e in events_of(again, clock, "prefill")]
    assert chunks == [(192, 11)]
    assert "192 prompt tokens from the prefix cache" in summarize(snapshot(again.trace,
                                                                           clock.now))


def test_long_prompt_chunks_show_in_the_summary() -> None:
    clock = FakeClock()
    scheduler = make_scheduler(clock, num_blocks=128, max_num_batched_tokens=64)
    request = add(scheduler, clock, "long", 150, max_tokens=2)
    run(scheduler, clock)
    chunks = [(e["first_position"], e["num_tokens"]) for e in events_of(request, clock, "prefill")]
    assert chunks == [(0, 64), (64, 64), (128, 22)]
    assert summarize(snapshot(request.trace, clock.now)) == (
        "not queued; prompt prefilled in 3 chunks")


def test_flapping_reasons_keep_the_trace_short() -> None:
    clock = FakeClock()
    scheduler = make_scheduler(clock)
    request = add(scheduler, clock, "r", 10)
    cause_names = [KV_BLOCKS_SHORT, BATCH_FULL]
    for step in range(200):  # drive the recorder directly: the reason flips every step
        cause = WaitCause(cause_names[step % 2], {"max_num_seqs": 1, "blocks_needed": 1,
                                                  "blocks_free": 0}, step)
        request.trace.wait(cause, clock.now, step, num_ahead=step % 13)
        clock.now += STEP_SECONDS
    waits = [e for e in request.trace.events if e[0] == "wait"]
    assert len(waits) <= MAX_WAITS_PER_EPISODE
    assert sum(w[4] for w in waits) == 199  # every closed step is still counted
    scheduler.finish_requests(["r"])


def test_tracing_off_records_nothing_and_schedules_the_same() -> None:
    outputs = {}
    for trace in (True, False):
        clock = FakeClock()
        scheduler = make_scheduler(clock, trace=trace)
        requests = [add(scheduler, clock, name, 100, max_tokens=60) for name in "ABC"]
        run(scheduler, clock)
        outputs[trace] = [r.output_token_ids for r in requests]
        assert all((r.trace is None) != trace for r in requests)
    assert outputs[True] == outputs[False]


def test_store_keeps_finished_traces_within_count_and_age_and_hides_other_tenants() -> None:
    clock = FakeClock()
    scheduler = make_scheduler(clock, num_blocks=64)
    store = TraceStore(max_finished=2, max_age_seconds=60, clock=clock)
    requests = {}
    for name in ("r0", "r1", "r2"):
        requests[name] = add(scheduler, clock, name, 10)
        store.add(name, [requests[name]])
    store.set_owner("r1", "acme")
    running = store.report("r1", now=clock.now)
    assert running is not None and running["status"] == "running"
    run(scheduler, clock)
    for name in requests:
        store.finish(name)
    assert store.report("r0") is None, "only the 2 newest finished traces are kept"
    assert store.report("r1", tenant="beta") is None
    assert store.report("r1", tenant="acme")["status"] == "finished"
    assert store.report("r1")["requests"][0]["id"] == "r1"
    assert store.report("r2", tenant="acme") is None, "a tenant never sees an unowned request"
    clock.now += 61
    assert store.report("r1") is None and store.report("r2") is None
    assert len(store) == 0
