"""Request priority in the scheduler, without a model: admission order, preemption order, the
starvation bound of aging, and the bookkeeping invariants under random prioritised load."""

from __future__ import annotations

import random

import pytest

from tests.engine.test_scheduler import run_to_completion, step
from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.errors import ConfigError
from tokenmill.sampling_params import SamplingParams

EOS = 2


class Clock:
    """A hand-moved clock: aging depends on time, so tests set it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(clock: Clock, *, aging: float = 10.0, num_blocks: int = 64,
                   block_size: int = 16, max_num_seqs: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, priority_aging_seconds=aging),
                     CacheConfig(block_size=block_size), num_blocks=num_blocks,
                     max_model_len=1024, clock=clock)


def make_request(request_id: str, priority: int, num_prompt: int = 8,
                 max_tokens: int = 4) -> Request:
    start = 10_000 * (sum(map(ord, request_id)) % 500)  # distinct prompts: no prefix sharing
    return Request(request_id, list(range(start, start + num_prompt)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), eos_token_id=EOS,
                   priority=priority)


def admission_order(scheduler: Scheduler) -> list[str]:
    """Run to completion; the ids in the order they were first admitted."""
    order: list[str] = []
    while scheduler.has_unfinished_requests():
        out, _ = step(scheduler)
        order += [new.request_id for new in out.scheduled_new_requests
                  if new.request_id not in order]
    scheduler.check_no_leaks()
    return order


def test_more_urgent_requests_are_admitted_first_and_equal_ones_in_arrival_order() -> None:
    clock = Clock()
    scheduler = make_scheduler(clock, max_num_seqs=1)
    for request_id, priority in [("low-1", 1), ("mid-1", 0), ("low-2", 1), ("high", -1),
                                 ("mid-2", 0)]:
        scheduler.add_request(make_request(request_id, priority))
    assert admission_order(scheduler) == ["high", "mid-1", "mid-2", "low-1", "low-2"]


def test_equal_priorities_are_first_come_first_served_even_if_the_clock_steps_back() -> None:
    clock = Clock()
    scheduler = make_scheduler(clock, max_num_seqs=1)
    for index in range(6):
        clock.now -= 5.0  # a wall clock adjusted backwards must not reorder equal priorities
        scheduler.add_request(make_request(f"r{index}", 3))
    assert admission_order(scheduler) == [f"r{index}" for index in range(6)]


def test_preemption_takes_the_least_urgent_then_the_latest_arrived() -> None:
    clock = Clock()
    # 9 blocks of 4 tokens; three requests of 8 prompt + 12 output tokens need 5 blocks each.
    scheduler = make_scheduler(clock, num_blocks=9, block_size=4, max_num_seqs=3)
    requests = {"low-old": 1, "urgent-young": 0, "low-young": 1}
    for request_id, priority in requests.items():
        scheduler.add_request(make_request(request_id, priority, max_tokens=12))
        clock.now += 1.0
    preempted: list[str] = []
    while scheduler.has_unfinished_requests():
        out, _ = step(scheduler)
        # the order within one step: the running list's tail goes first
        preempted += sorted(out.preempted_request_ids,
                            key=lambda rid: -list(requests).index(rid))
    scheduler.check_no_leaks()
    # low-young goes first; low-old gives way too although it arrived before urgent-young,
    # which is never preempted
    assert preempted[0] == "low-young"
    assert "low-old" in preempted
    assert "urgent-young" not in preempted


def test_an_urgent_request_takes_tokens_first_and_the_running_list_stays_ordered() -> None:
    clock = Clock()
    scheduler = make_scheduler(clock, max_num_seqs=4)
    for request_id, priority in [("a", 2), ("b", 1), ("c", 0), ("d", 1)]:
        scheduler.add_request(make_request(request_id, priority, max_tokens=3))
    step(scheduler)
    assert [r.request_id for r in scheduler.running] == ["c", "b", "d", "a"]
    run_to_completion(scheduler)


def test_aging_bounds_starvation_by_priority_times_aging_seconds() -> None:
    """A priority-5 request under a steady stream of priority-0 arrivals (one a second, aging 1 s):
    it is admitted before any arrival more than 5 s younger than it, as the documented rule says;
    with aging off it starves for as long as the stream lasts."""
    for aging, expect_admitted in ((1.0, True), (0.0, False)):
        clock = Clock()
        scheduler = make_scheduler(clock, aging=aging, max_num_seqs=1)
        start = clock.now
        scheduler.add_request(make_request("patient", 5, max_tokens=1))
        arrivals: dict[str, float] = {}
        admitted: list[str] = []
        for index in range(30):
            request_id = f"urgent-{index}"
            arrivals[request_id] = clock.now
            scheduler.add_request(make_request(request_id, 0, max_tokens=1))
            out, _ = step(scheduler)  # one request of one token per step: one admission a step
            admitted += [new.request_id for new in out.scheduled_new_requests]
            clock.now += 1.0
        if expect_admitted:
            assert "patient" in admitted
            after = admitted[admitted.index("patient") + 1:]
            before = admitted[:admitted.index("patient")]
            # the bound: nobody arriving more than 5 s after it went first...
            assert all(arrivals[rid] - start <= 5.0 for rid in before)
            # ...and aging promotes no further than the rule (ties go to the earlier arrival)
            assert all(arrivals[rid] - start >= 5.0 for rid in after)
        else:
            assert "patient" not in admitted
        scheduler.finish_requests(list(scheduler.requests))
        scheduler.check_no_leaks()


def test_random_prioritised_load_keeps_the_invariants() -> None:
    """Random arrivals, priorities, lengths and aborts in a pool small enough to preempt: both
    queues stay ordered by key, every request is accounted for, and no block leaks."""
    rng = random.Random(1234)
    for trial in range(20):
        clock = Clock()
        scheduler = make_scheduler(clock, aging=rng.choice([0.0, 0.5, 10.0]),
                                   num_blocks=rng.randint(12, 40), block_size=4,
                                   max_num_seqs=rng.randint(1, 6))
        num_added = 0
        for _ in range(200):
            if num_added < 40 and rng.random() < 0.4:
                request = make_request(f"t{trial}-{num_added}", rng.randint(-3, 3),
                                       num_prompt=rng.randint(1, 20),
                                       max_tokens=rng.randint(1, 20))
                scheduler.add_request(request)
                num_added += 1
            if scheduler.requests and rng.random() < 0.05:
                scheduler.finish_requests(rng.choice(list(scheduler.requests)))
            step(scheduler)
            clock.now += rng.random()
            keys = [r.queue_key for r in scheduler.running]
            assert keys == sorted(keys)
            keys = [r.queue_key for r in scheduler.waiting]
            assert keys == sorted(keys)
            assert all(r.status is RequestStatus.RUNNING for r in scheduler.running)
            assert ({r.request_id for r in scheduler.running}
                    | {r.request_id for r in scheduler.waiting}) == set(scheduler.requests)
        run_to_completion(scheduler)


def test_a_negative_or_infinite_aging_is_refused() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="priority_aging_seconds"):
            SchedulerConfig(priority_aging_seconds=bad)
