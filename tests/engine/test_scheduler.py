"""Scheduler without a model: hand-written runner outputs, assertions on what gets scheduled."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

import pytest

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import EngineCoreOutput, RunnerOutput, SchedulerOutput
from tokenmill.errors import InvalidRequestError, PromptTooLongError, RequestRejectedError
from tokenmill.sampling_params import SamplingParams

EOS = 2


def make_scheduler(*, num_blocks: int = 64, block_size: int = 16, max_model_len: int = 1024,
                   max_num_batched_tokens: int = 512, max_num_seqs: int = 16,
                   max_waiting_requests: int = 1024, prefix_caching: bool = True) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                        max_waiting_requests=max_waiting_requests),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
        num_blocks=num_blocks, max_model_len=max_model_len)


def make_request(request_id: str, prompt: list[int] | int, *, cache_salt: str | None = None,
                 **params: object) -> Request:
    if isinstance(prompt, int):  # distinct per id, so only tests that mean to share a prefix do
        start = 10_000 * (zlib.crc32(request_id.encode()) % 1000)
        prompt = list(range(start, start + prompt))
    params.setdefault("max_tokens", 4)
    return Request(request_id, prompt, SamplingParams(**params), eos_token_id=EOS,
                   cache_salt=cache_salt)


def next_token(request: Request) -> int:
    """A pretend model: the next token depends only on the tokens so far (never EOS)."""
    digest = hashlib.blake2b(repr(request.all_token_ids).encode(), digest_size=4).digest()
    return 1000 + int.from_bytes(digest) % 5000


def runner_output(scheduler: Scheduler, out: SchedulerOutput,
                  choose: Callable[[Request], int] = next_token) -> RunnerOutput:
    """Sample only for requests whose scheduled tokens reach the end of their known tokens."""
    sampled = {}
    for request in scheduler.scheduled_requests(out):
        request_id = request.request_id
        if request.num_computed_tokens + out.num_scheduled_tokens[request_id] \
                == request.num_tokens:
            sampled[request_id] = choose(request)
    return RunnerOutput(sampled_token_ids=sampled)


def num_computed(out: SchedulerOutput, request_id: str) -> int:
    """Where ``request_id`` starts this step, as the runner is told (new or cached)."""
    for new in out.scheduled_new_requests:
        if new.request_id == request_id:
            return new.num_computed_tokens
    cached = out.scheduled_cached_requests
    return cached.num_computed_tokens[cached.request_ids.index(request_id)]


def step(scheduler: Scheduler, choose: Callable[[Request], int] = next_token,
         ) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = scheduler.schedule()
    return out, scheduler.update_from_output(out, runner_output(scheduler, out, choose))


def run_to_completion(scheduler: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < max_steps, "scheduler made no progress"
        out, _ = step(scheduler)
        outputs.append(out)
    scheduler.check_no_leaks()
    return outputs


def test_token_budget_and_max_num_seqs_are_respected() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=64, max_num_seqs=3)
    requests = [make_request(f"r{i}", 40, max_tokens=6) for i in range(8)]
    for request in requests:
        scheduler.add_request(request)
    for out in run_to_completion(scheduler):
        assert out.total_num_scheduled_tokens <= 64
        assert len(out.num_scheduled_tokens) <= 3
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 6
               for r in requests)


def test_long_prompt_is_chunked_and_samples_only_after_the_last_chunk() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=256)
    request = make_request("long", 1000, max_tokens=3)
    scheduler.add_request(request)
    chunks = []
    for _ in range(4):
        out, outputs = step(scheduler)
        chunks.append(out.num_scheduled_tokens["long"])
        if len(chunks) < 4:
            assert outputs == [] and request.num_output_tokens == 0
    assert chunks == [256, 256, 256, 232]
    assert [o.request_id for o in outputs] == ["long"] and request.num_output_tokens == 1
    assert request.num_computed_tokens == 1000
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"long": 1}  # now decoding


def test_decodes_and_prefill_chunks_share_a_step() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=100)
    short = make_request("short", 10, max_tokens=20)
    scheduler.add_request(short)
    step(scheduler)
    assert short.num_output_tokens == 1
    scheduler.add_request(make_request("long", 500))
    out, outputs = step(scheduler)
    # Running first: the decode takes one token, the new prompt gets the rest of the budget.
    assert out.num_scheduled_tokens == {"short": 1, "long": 99}
    assert list(out.num_scheduled_tokens) == ["short", "long"]  # the batch order
    assert out.scheduled_cached_requests.request_ids == ["short"]
    assert [new.request_id for new in out.scheduled_new_requests] == ["long"]
    assert [o.request_id for o in outputs] == ["short"]


def test_new_arrivals_join_at_the_next_step() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 20, max_tokens=10))
    out, _ = step(scheduler)
    assert list(out.num_scheduled_tokens) == ["a"]
    scheduler.add_request(make_request("b", 30, max_tokens=10))
    assert scheduler.get_stats().num_waiting == 1
    out, _ = step(scheduler)
    assert out.num_scheduled_tokens == {"a": 1, "b": 30}


def test_finished_requests_leave_at_once() -> None:
    scheduler = make_scheduler()
    quick = make_request("quick", 20, max_tokens=1)
    slow = make_request("slow", 20, max_tokens=5)
    scheduler.add_request(quick)
    scheduler.add_request(slow)
    _, outputs = step(scheduler)
    finished = {o.request_id: o for o in outputs if o.finished}
    assert finished["quick"].finish_reason == "length"
    assert quick.block_ids == [] and scheduler.running == [slow]
    assert scheduler.block_manager.num_used_blocks == 2  # only slow's blocks remain
    out, _ = step(scheduler)
    assert "quick" not in out.num_scheduled_tokens
    assert out.finished_request_ids == {"quick"}  # so the runner can drop its state


def test_stop_conditions() -> None:
    scheduler = make_scheduler()
    eos_request = make_request("eos", 8, max_tokens=10)
    min_request = make_request("min", 8, max_tokens=10, min_tokens=3)
    ignore_request = make_request("ignore", 8, max_tokens=3, ignore_eos=True)
    stop_id_request = make_request("stopid", 8, max_tokens=10, stop_token_ids=[77])
    for request in (eos_request, min_request, ignore_request, stop_id_request):
        scheduler.add_request(request)
    script = {"eos": [EOS], "min": [EOS, EOS, EOS], "ignore": [EOS, EOS, EOS],
              "stopid": [5, 77]}
    last: dict[str, EngineCoreOutput] = {}
    while scheduler.has_unfinished_requests():
        _, outputs = step(scheduler, lambda r: script[r.request_id][r.num_output_tokens])
        last.update({o.request_id: o for o in outputs})
    scheduler.check_no_leaks()
    assert (last["eos"].finish_reason, last["eos"].stop_reason) == ("stop", None)
    # EOS before min_tokens does not stop; the third one does.
    assert min_request.output_token_ids == [EOS] * 3 and last["min"].finish_reason == "stop"
    assert last["ignore"].finish_reason == "length" and ignore_request.num_output_tokens == 3
    assert (last["stopid"].finish_reason, last["stopid"].stop_reason) == ("stop", 77)
    assert stop_id_request.status == RequestStatus.FINISHED_STOPPED


def test_max_tokens_none_runs_up_to_the_context() -> None:
    scheduler = make_scheduler(max_model_len=40)
    request = make_request("open", 30, max_tokens=None)
    scheduler.add_request(request)
    run_to_completion(scheduler)
    assert request.num_tokens == 40 and request.finish_reason == "length"


def test_max_tokens_none_stops_where_the_kv_pool_ends_when_that_comes_first() -> None:
    # 4 blocks of 16 = 64 tokens of KV, context 1024: a 30-token prompt gets 64 - 30 = 34.
    scheduler = make_scheduler(max_model_len=1024, num_blocks=4, block_size=16)
    request = make_request("pool", 30, max_tokens=None)
    scheduler.add_request(request)
    run_to_completion(scheduler)
    assert request.num_output_tokens == 34 and request.finish_reason == "length"
    assert scheduler.get_stats().num_preemptions == 0


def test_preemption_when_the_pool_is_too_small_everyone_finishes_with_the_same_output() -> None:
    def generate(num_blocks: int) -> tuple[dict[str, list[int]], Scheduler]:
        scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=64)
        for i in range(6):
            scheduler.add_request(make_request(f"r{i}", list(range(i, i + 30)), max_tokens=40))
        requests = list(scheduler.requests.values())
        run_to_completion(scheduler)
        return {r.request_id: r.output_token_ids for r in requests}, scheduler

    roomy, roomy_scheduler = generate(num_blocks=256)
    # Each request needs ceil(69 / 4) = 18 blocks; 24 hold one at a time with room to spare.
    tight, tight_scheduler = generate(num_blocks=24)
    assert roomy_scheduler.get_stats().num_preemptions == 0
    assert tight_scheduler.get_stats().num_preemptions > 0
    assert tight == roomy
    assert all(len(tokens) == 40 for tokens in tight.values())


def test_preempted_request_requeues_at_the_front_and_keeps_its_output() -> None:
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=2)
    old = make_request("old", 8, max_tokens=12)
    young = make_request("young", 8, max_tokens=12)
    later = make_request("later", 4, max_tokens=2)
    for request in (old, young, later):
        scheduler.add_request(request)
    preempted_at = None
    for _ in range(10):
        out, _ = step(scheduler)
        if out.preempted_request_ids:
            preempted_at = out
            break
    # Both hold 3 full blocks (12 tokens computed) when old needs a fourth: young gives way.
    assert preempted_at is not None and preempted_at.preempted_request_ids == {"young"}
    assert preempted_at.num_scheduled_tokens == {"old": 1}
    assert young.status == RequestStatus.PREEMPTED and young.block_ids == []
    assert young.num_computed_tokens == 0 and young.num_output_tokens == 5
    assert young.stats.num_preemptions == 1
    assert list(scheduler.waiting) == [young, later]
    run_to_completion(scheduler)
    assert young.num_output_tokens == 12 and old.num_output_tokens == 12
    assert later.num_output_tokens == 2


def test_admission_rejects_what_can_never_fit_with_the_numbers() -> None:
    scheduler = make_scheduler(max_model_len=128, num_blocks=4, block_size=16)
    with pytest.raises(PromptTooLongError) as info:
        scheduler.add_request(make_request("ctx", 100, max_tokens=50))
    for number in ("100", "50", "150", "128"):
        assert number in info.value.message
    assert info.value.status_code == 400
    with pytest.raises(PromptTooLongError) as info:
        scheduler.add_request(make_request("pool", 60, max_tokens=10))
    for number in ("60", "10", "5 KV blocks", "4 blocks", "64 tokens"):
        assert number in info.value.message
    with pytest.raises(PromptTooLongError, match="128"):
        scheduler.add_request(make_request("full", 128, max_tokens=None))
    # Exactly filling the pool is fine: 60 + 5 tokens, the last one never needs a KV slot.
    scheduler.add_request(make_request("fits", 60, max_tokens=5))
    assert not scheduler.waiting[0].is_finished
    run_to_completion(scheduler)


def test_full_waiting_queue_is_refused_with_429() -> None:
    scheduler = make_scheduler(max_waiting_requests=2)
    scheduler.add_request(make_request("a", 5))
    scheduler.add_request(make_request("b", 5))
    with pytest.raises(RequestRejectedError, match="max_waiting_requests=2") as info:
        scheduler.add_request(make_request("c", 5))
    assert info.value.status_code == 429
    assert "c" not in scheduler.requests
    step(scheduler)  # a and b are admitted: the queue has room again
    scheduler.add_request(make_request("c", 5))
    run_to_completion(scheduler)


def test_abort_frees_blocks_at_once_wherever_the_request_is() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    running = make_request("running", 64, max_tokens=50)
    waiting = make_request("waiting", 64, max_tokens=50)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    step(scheduler)
    assert scheduler.block_manager.num_used_blocks == 4
    aborted = scheduler.finish_requests(["running", "waiting", "unknown"])
    assert [r.request_id for r in aborted] == ["running", "waiting"]
    assert scheduler.block_manager.num_used_blocks == 0
    assert running.finish_reason == "abort" and running.stats.finished_time is not None
    assert not scheduler.has_unfinished_requests()
    out = scheduler.schedule()
    # an empty step never reaches the runner: the ids it must forget wait for the next step
    assert out.is_empty and out.finished_request_ids == set()
    scheduler.check_no_leaks()
    scheduler.add_request(make_request("next", 8, max_tokens=1))
    out, _ = step(scheduler)
    assert out.finished_request_ids == {"running", "waiting"}
    assert scheduler.schedule().finished_request_ids == set()  # delivered once


def test_abort_while_the_step_runs_drops_its_result() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 20, max_tokens=5)
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.finish_requests("a")
    late = RunnerOutput(sampled_token_ids={"a": 1234})  # the runner computed it all the same
    assert scheduler.update_from_output(out, late) == []
    assert request.num_output_tokens == 0
    scheduler.check_no_leaks()


def test_stop_string_finish_from_the_frontend() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 20, max_tokens=5)
    scheduler.add_request(request)
    step(scheduler)
    scheduler.finish_requests("a", RequestStatus.FINISHED_STOPPED, stop_reason="###")
    assert (request.finish_reason, request.stop_reason) == ("stop", "###")
    scheduler.check_no_leaks()


@pytest.mark.parametrize("finish_first", [True, False], ids=["first-finished", "first-running"])
def test_shared_512_token_prefix_computes_only_the_suffix(finish_first: bool) -> None:
    scheduler = make_scheduler(num_blocks=128, max_model_len=2048)
    prefix = list(range(1000, 1512))
    first = make_request("first", prefix + [7] * 30, max_tokens=3)
    scheduler.add_request(first)
    if finish_first:
        run_to_completion(scheduler)
    else:
        step(scheduler)
        step(scheduler)
    second = make_request("second", prefix + [9] * 20, max_tokens=3)
    scheduler.add_request(second)
    out, _ = step(scheduler)
    assert num_computed(out, "second") == 512
    assert out.num_scheduled_tokens["second"] == 20  # only the suffix runs through the model
    assert second.num_cached_tokens == 512
    salted = make_request("salted", prefix + [9] * 20, max_tokens=3, cache_salt="tenant-b")
    scheduler.add_request(salted)
    out, _ = step(scheduler)
    assert num_computed(out, "salted") == 0 and salted.num_cached_tokens == 0
    stats = scheduler.get_stats()
    assert stats.prefix_cache_queries == 542 + 532 + 532
    assert stats.prefix_cache_hits == 512
    run_to_completion(scheduler)


def test_n_children_admitted_in_one_step_share_prompt_blocks() -> None:
    scheduler = make_scheduler(block_size=16)
    prompt = list(range(500, 570))  # 70 tokens: 4 full blocks + 6 tokens
    children = [make_request(f"parent-{i}", prompt, max_tokens=4, seed=i) for i in range(4)]
    for child in children:
        scheduler.add_request(child)
    out, _ = step(scheduler)
    assert set(out.num_scheduled_tokens) == {c.request_id for c in children}
    # The first child computes the prompt; the others hit its 4 full blocks in the same step and
    # compute only their last 6 tokens, each in a block of its own.
    assert out.num_scheduled_tokens == {"parent-0": 70, "parent-1": 6, "parent-2": 6,
                                        "parent-3": 6}
    assert scheduler.block_manager.num_used_blocks == 5 + 3  # not 4 copies of 5
    shared = set(children[0].block_ids[:4])
    assert all(set(c.block_ids[:4]) == shared for c in children)
    run_to_completion(scheduler)


def test_request_and_scheduler_stats() -> None:
    ticks = iter(range(100, 10_000))
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=32), CacheConfig(block_size=16),
                          num_blocks=16, max_model_len=256, clock=lambda: float(next(ticks)))
    request = Request("a", list(range(50)), SamplingParams(max_tokens=2), arrival_time=50.0)
    scheduler.add_request(request)
    step(scheduler)
    stats = scheduler.get_stats()
    assert (stats.num_running, stats.num_waiting, stats.batch_size) == (1, 0, 1)
    assert stats.num_batched_tokens == 32
    assert stats.kv_cache_usage == pytest.approx(2 / 16)
    run_to_completion(scheduler)
    timeline = request.stats
    assert timeline.arrival_time == 50.0
    assert (timeline.arrival_time < timeline.queued_time < timeline.first_scheduled_time
            < timeline.first_token_time <= timeline.last_token_time <= timeline.finished_time)
    assert timeline.time_to_first_token == timeline.first_token_time - 50.0
    assert scheduler.get_stats().kv_cache_usage == 0.0


def test_duplicate_id_and_empty_prompt_are_refused() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("same", 5))
    with pytest.raises(InvalidRequestError, match="'same' is already in use"):
        scheduler.add_request(make_request("same", 5))
    with pytest.raises(InvalidRequestError, match="empty") as info:
        scheduler.add_request(make_request("empty", []))
    assert info.value.param == "prompt"
    run_to_completion(scheduler)
