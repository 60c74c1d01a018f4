"""Property test: scheduler + block manager under random load never leak, double-free or deadlock.

A fake runner stands in for the model and keeps a *simulated paged KV cache*: for every scheduled
token it writes the token id into the slot the block table names, then checks that every position
the request attends to holds that request's own token. So a prefix hit on the wrong block, a block
evicted or reallocated while still shared, or a stale block table would all show up as a mismatch,
not just as bad bookkeeping.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.block_manager import cdiv
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.errors import PromptTooLongError, RequestRejectedError
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.request_state import RequestStates

EOS = 0
STOP_TOKEN = 9
VOCAB = 12  # small, so generated continuations collide and exercise the prefix cache too
PREFIXES = [[100 + 40 * k + i for i in range(40)] for k in range(3)]


@dataclass
class Arrival:
    prefix: int
    prompt_len: int
    max_tokens: int | None
    salt: str | None
    n: int
    ignore_eos: bool


arrivals = st.builds(
    Arrival,
    prefix=st.integers(0, len(PREFIXES) - 1),
    prompt_len=st.integers(1, 48),
    max_tokens=st.one_of(st.integers(1, 30), st.none()),
    salt=st.sampled_from([None, None, "tenant-a", "tenant-b"]),
    n=st.integers(1, 3),
    ignore_eos=st.booleans(),
)

step_events = st.tuples(
    st.lists(arrivals, max_size=4),          # new requests before this step
    st.lists(st.integers(0, 1000), max_size=2),  # aborts before schedule (index into live ids)
    st.lists(st.integers(0, 1000), max_size=1),  # aborts while the step runs
)

scenarios = st.fixed_dictionaries({
    "block_size": st.sampled_from([1, 2, 4, 16]),
    # Pool in tokens (rounded down to blocks): small enough that concurrent requests must preempt.
    "pool_tokens": st.integers(8, 160),
    "max_num_batched_tokens": st.integers(1, 48),
    "max_num_seqs": st.integers(1, 6),
    "max_waiting_requests": st.sampled_from([2, 8, 64]),
    "max_model_len": st.sampled_from([8, 48, 96]),
    "prefix_caching": st.booleans(),
    "seed": st.integers(0, 2**32 - 1),
    "events": st.lists(step_events, min_size=3, max_size=25),
})


class FakeRunner:
    """Writes token ids as 'KV' into paged slots and checks every read against the request.

    Like the model runner, it knows requests only from the plain-data step messages, through the
    runner's own ``RequestStates``; each step its copy must equal the scheduler's live request."""

    def __init__(self, num_blocks: int, block_size: int, seed: int) -> None:
        self.block_size = block_size
        self.slots: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.rng = random.Random(seed)
        self.states = RequestStates()

    def execute(self, out: SchedulerOutput, scheduler: Scheduler) -> RunnerOutput:
        bs = self.block_size
        self.states.update_from(out)
        assert set(out.num_scheduled_tokens) <= set(self.states)
        for rid in out.num_scheduled_tokens:
            request, state = scheduler.requests.get(rid), self.states[rid]
            if request is not None and request.status is RequestStatus.RUNNING:  # not aborted
                assert state.all_token_ids == request.all_token_ids, f"{request} tokens drifted"
                assert state.block_ids == request.block_ids, f"{request} block table drifted"
                assert state.num_computed_tokens == request.num_computed_tokens
        for source, destination in out.block_copies:  # before the forward, as the runner does
            self.slots[destination] = list(self.slots[source])
        # Like one layer of the model: every token's K/V is written before any attention reads.
        for rid, num_new in out.num_scheduled_tokens.items():
            state = self.states[rid]
            start = state.num_computed_tokens
            for pos in range(start, start + num_new):
                block_id = state.block_ids[pos // bs]
                self.slots[block_id][pos % bs] = state.all_token_ids[pos]
        sampled = {}
        for rid, num_new in out.num_scheduled_tokens.items():
            state = self.states[rid]
            end = state.num_computed_tokens + num_new
            seen = [self.slots[state.block_ids[pos // bs]][pos % bs] for pos in range(end)]
            assert seen == state.all_token_ids[:end], f"{rid} attends to foreign KV"
            if state.samples_at(end):
                sampled[rid] = self.rng.randrange(VOCAB)
        return RunnerOutput(sampled_token_ids=sampled)

    def check_forgets_finished(self, scheduler: Scheduler) -> None:
        """Every request the runner still holds is one the scheduler still runs (or one whose
        end it will hear of with the next step)."""
        pending = scheduler._finished_since_last_step
        for rid in self.states:
            assert rid in pending or (rid in scheduler.requests and scheduler.requests[rid].status
                                      is RequestStatus.RUNNING), f"runner holds stale {rid}"


def check_invariants(scheduler: Scheduler, config: dict) -> None:
    bm = scheduler.block_manager
    refs: Counter[int] = Counter()
    assert len(scheduler.running) <= config["max_num_seqs"]
    assert {r.request_id for r in scheduler.running} | {r.request_id for r in scheduler.waiting} \
        == set(scheduler.requests)
    for request in scheduler.running:
        assert request.status == RequestStatus.RUNNING
        assert len(request.block_ids) >= cdiv(request.num_computed_tokens, bm.block_size)
        assert request.num_computed_tokens <= request.num_tokens
    for request in scheduler.waiting:
        assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert request.block_ids == [] and request.num_computed_tokens == 0
    for request in scheduler.requests.values():
        assert len(set(request.block_ids)) == len(request.block_ids)
        refs.update(request.block_ids)
    refs.update(bm.pinned_block_ids)  # copy sources held until the step has run
    for block in bm.blocks:
        assert block.ref_cnt == refs[block.block_id], f"block {block.block_id} ref count drifted"
        assert (block.ref_cnt == 0) == (block.block_id in bm.free_queue)
    assert 0.0 <= bm.usage <= 1.0


# derandomize: the same 400 scenarios every run, so a CI run is reproducible; hunt for new bugs
# with derandomize off and `--hypothesis-seed=N`. Seed 4 found the whole-prompt-hit deadlock that
# test_a_cached_prompt_that_fills_the_pool_is_not_stuck_waiting pins.
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(config=scenarios)
def test_random_load_never_leaks_double_frees_or_deadlocks(config: dict) -> None:
    config["num_blocks"] = max(1, config["pool_tokens"] // config["block_size"])
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=config["max_num_batched_tokens"],
                        max_num_seqs=config["max_num_seqs"],
                        max_waiting_requests=config["max_waiting_requests"]),
        CacheConfig(block_size=config["block_size"],
                    enable_prefix_caching=config["prefix_caching"]),
        num_blocks=config["num_blocks"], max_model_len=config["max_model_len"])
    runner = FakeRunner(config["num_blocks"], config["block_size"], config["seed"])
    rng = random.Random(config["seed"])
    accepted: list[Request] = []
    aborted: set[str] = set()
    next_id = 0

    def abort(indices: list[int]) -> None:
        live = sorted(scheduler.requests)
        for index in indices:
            if live:
                request_id = live[index % len(live)]
                if scheduler.finish_requests([request_id]):
                    aborted.add(request_id)

    def step() -> None:
        out = scheduler.schedule()
        assert out.total_num_scheduled_tokens <= config["max_num_batched_tokens"]
        assert len(out.num_scheduled_tokens) <= config["max_num_seqs"]
        check_invariants(scheduler, config)
        abort(mid_step_aborts)
        scheduler.update_from_output(out, runner.execute(out, scheduler))
        check_invariants(scheduler, config)
        runner.check_forgets_finished(scheduler)

    for new, early_aborts, mid_step_aborts in config["events"]:
        for arrival in new:
            prompt = (PREFIXES[arrival.prefix] + [rng.randrange(VOCAB) for _ in range(60)])
            params = SamplingParams(max_tokens=arrival.max_tokens, ignore_eos=arrival.ignore_eos,
                                    stop_token_ids=[STOP_TOKEN], n=arrival.n)
            for _ in range(arrival.n):  # the frontend's fan-out: n children, one prompt
                request = Request(f"req-{next_id}", prompt[:arrival.prompt_len], params,
                                  eos_token_id=EOS, cache_salt=arrival.salt)
                next_id += 1
                waiting_before = len(scheduler.waiting)
                try:
                    scheduler.add_request(request)
                except PromptTooLongError:
                    event("rejected: too long")
                    max_tokens = arrival.max_tokens or config["max_model_len"] - arrival.prompt_len
                    total = arrival.prompt_len + max(max_tokens, 1)
                    assert (total > config["max_model_len"] or max_tokens < 1 or
                            cdiv(total - 1, config["block_size"]) > config["num_blocks"])
                except RequestRejectedError:
                    event("rejected: queue full")
                    assert waiting_before >= config["max_waiting_requests"]
                else:
                    accepted.append(request)
        abort(early_aborts)
        step()

    # Drain. The oldest running request can never be preempted and advances every step, and an
    # empty running list always admits the head of the queue, which bounds the steps needed.
    mid_step_aborts = []
    bound = sum(r.num_prompt_tokens + (r.max_tokens or 0) + 1 for r in accepted) + 1
    for _ in range(bound):
        if not scheduler.has_unfinished_requests():
            break
        step()
    assert not scheduler.has_unfinished_requests(), f"deadlock: {list(scheduler.requests.values())}"
    scheduler.check_no_leaks()
    stats = scheduler.get_stats()
    event(f"accepted requests: {min(len(accepted), 10) // 5 * 5}+")
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix hits: {stats.prefix_cache_hits > 0}")
    event(f"aborted: {bool(aborted)}")

    for request in accepted:
        assert request.is_finished and request.block_ids == []
        if request.request_id in aborted:
            assert request.finish_reason == "abort"
            continue
        assert request.num_output_tokens <= request.max_tokens
        last = request.output_token_ids[-1]
        if request.finish_reason == "length":
            assert request.num_output_tokens == request.max_tokens
        else:
            assert last == STOP_TOKEN or (last == EOS and not request.sampling_params.ignore_eos)


def test_a_cached_prompt_that_fills_the_pool_is_not_stuck_waiting() -> None:
    """Found by the property test: an 8-token prompt cached whole, in an 8-block pool. Reusing the
    hit copies the last cached block, which needs its source held beside the copy (9 blocks), so
    the request was neither admitted nor refused, and waited for ever with nothing running."""
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=1, max_num_seqs=1),
                          CacheConfig(block_size=1, enable_prefix_caching=True),
                          num_blocks=8, max_model_len=48)
    runner = FakeRunner(8, 1, seed=0)
    prompt = PREFIXES[0][:8]
    for name in ("first", "again"):
        request = Request(name, prompt, SamplingParams(max_tokens=1), eos_token_id=EOS)
        scheduler.add_request(request)
        for _ in range(20):
            if not scheduler.has_unfinished_requests():
                break
            out = scheduler.schedule()
            scheduler.update_from_output(out, runner.execute(out, scheduler))
        assert request.is_finished, f"{request} never ran"
        assert request.num_output_tokens == 1
    assert scheduler.block_manager.num_free_blocks == 8
