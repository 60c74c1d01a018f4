"""Continuous-batching scheduler: one rule, no prefill/decode phases.

Each step hands out ``{request_id: num_new_tokens}`` under ``max_num_batched_tokens`` and
``max_num_seqs`` until every request's ``num_computed_tokens`` catches up with its ``num_tokens``.
Running requests go first, then waiting ones. Both queues are ordered by one key per request
(``request_queue.py``): priority (lower = more urgent, vLLM's convention) aged by arrival time;
with equal priorities that is arrival order, first come, first served. Chunked prefill, mixed
batches of decodes and prefill chunks, prefix-cache hits and preemption by recompute all follow:

* a prompt longer than the remaining budget is simply given the budget (a chunk);
* a prefix hit starts a request with ``num_computed_tokens > 0``;
* when blocks run out, the running request with the worst key (least urgent, then latest arrived)
  is preempted: its blocks are freed, ``num_computed_tokens`` drops to 0 and it waits in the queue
  under its old key (with equal priorities: at the front); its output tokens stay, so it resumes
  by recomputing prompt + output and continues where it was (and so does its grammar matcher,
  which has consumed exactly that output).

A waiting request never preempts a running one (vLLM's v1 scheduler does not either): priority
decides who takes a free slot or free blocks, and who loses blocks when a running request needs
more; an urgent arrival waits at most until a running request finishes or is preempted.

Structured output: ``update_from_output`` feeds each sampled token to the request's grammar matcher;
a request whose grammar is complete finishes with "stop" (no end-of-sequence step needed), one that
hits max_tokens first with "length".

Why this cannot deadlock: admission rejects any request that could not fit in the pool alone, the
first running request (best key) always gets tokens first and may preempt every one after it, so it
finishes; then the next one does, and so on.

Tracing (``SchedulerConfig.request_trace``): the scheduler writes each request's ``RequestTrace``
(see ``trace.py``) as it decides: why the waiting queue's head could not start this step, who was
admitted with how many prefix-cache tokens, each prefill chunk, each preemption and what forced it.
Decode steps record nothing, and waits are shared per run of identical steps, so a step costs O(1)
tracing work unless the queue or the reason changed.

Threading: call everything from the engine-core thread. ``finish_requests`` may run between
``schedule()`` and ``update_from_output()`` (an abort while the runner works): the freed blocks are
only handed out again by the next ``schedule()``, the runner still writes the KV of the step it was
given (through its own copy of the block table, see ``scheduler_output.py``), so blocks registered
in the prefix cache always hold what they claim, and the late result of the aborted request is
dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.block_manager import BlockManager, ComputedBlocks
from tokenmill.engine.drain_rate import DrainRate
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.request_queue import QueueKeys, WaitingQueue, insert_running
from tokenmill.engine.scheduler_output import (
    CachedRequestData,
    EngineCoreOutput,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
)
from tokenmill.engine.stats import SchedulerStats
from tokenmill.engine.trace import (
    BATCH_FULL,
    KV_BLOCKS_SHORT,
    PREEMPTING,
    TOKEN_BUDGET_SPENT,
    RequestTrace,
    WaitCause,
)
from tokenmill.errors import InvalidRequestError, PromptTooLongError, RequestRejectedError

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int,
                 clock: Callable[[], float] = time.time) -> None:
        assert max_model_len >= 1, max_model_len
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.clock = clock
        self.requests: dict[str, Request] = {}
        """Every unfinished request, by id."""
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        """By queue key (with equal priorities: admission order): the last one is the first to
        be preempted."""
        self.queue_keys = QueueKeys(scheduler_config.priority_aging_seconds)
        self._finished_since_last_step: set[str] = set()
        self.num_preemptions = 0
        self.num_steps = 0
        self._last_num_batched_tokens = 0
        self._last_batch_size = 0
        self.trace_requests = scheduler_config.request_trace
        self._wait_cause: WaitCause | None = None
        """Why the waiting queue's head could not start in the latest steps (tracing only)."""
        self._queue_changed = False
        """A request joined the waiting queue (new or preempted) since waits were last noted."""
        self._preempt_numbers: dict[str, int] = {}
        self.drain_rate = DrainRate()
        """Requests finished per second: the Retry-After of a 429 for a full waiting queue."""

    # ------------------------------------------------------------------ admission
    def add_request(self, request: Request) -> None:
        """Queue a request; it can be scheduled from the next ``schedule()`` on.

        Raises PromptTooLongError if it could never run (context or whole KV pool too small) and
        RequestRejectedError if the waiting queue is full.
        """
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use",
                                      param="request_id")
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token",
                                      param="prompt")
        max_tokens = request.sampling_params.max_tokens
        if request.pooling is not None:
            max_tokens = 0
        limit = self.scheduler_config.max_prompt_logprobs_len
        if request.sampling_params.prompt_logprobs is not None and num_prompt > limit:
            raise PromptTooLongError(
                f"prompt_logprobs: prompt log probabilities are computed for prompts of at "
                f"most {limit} tokens (max_prompt_logprobs_len); this prompt has {num_prompt}",
                param="prompt_logprobs")
        bm = self.block_manager
        if max_tokens is None:
            # The one default (the server passes None on): up to the end of the context, as vLLM
            # does, but never more than the whole KV pool holds, so it is never refused below.
            room = min(self.max_model_len, bm.num_blocks * bm.block_size) - num_prompt
            if num_prompt >= self.max_model_len:
                raise PromptTooLongError(
                    f"the prompt has {num_prompt} tokens, which leaves no room to generate in the "
                    f"model's context of {self.max_model_len} tokens", param="prompt")
            max_tokens = max(room, 1)  # a prompt over the pool is refused with both numbers below
        if num_prompt + max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) is "
                f"{num_prompt + max_tokens} tokens, more than the model's context of "
                f"{self.max_model_len}; shorten the prompt or lower max_tokens",
                param="max_tokens" if num_prompt < self.max_model_len else "prompt")
        # The last sampled token is never run through the model, so its KV needs no slot.
        num_blocks_needed = bm.num_blocks_for_tokens(num_prompt + max(max_tokens - 1, 0))
        if num_blocks_needed > bm.num_blocks:
            raise PromptTooLongError(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({max_tokens}) needs "
                f"{num_blocks_needed} KV blocks of {bm.block_size} tokens, but the whole KV cache "
                f"has {bm.num_blocks} blocks ({bm.num_blocks * bm.block_size} tokens); shorten "
                f"the prompt, lower max_tokens or give the server more kv_cache_memory",
                param="max_tokens")
        limit = self.scheduler_config.max_waiting_requests
        if len(self.waiting) >= limit:
            retry_after = self.drain_rate.retry_after_seconds(len(self.waiting), self.clock())
            raise RequestRejectedError(
                f"the server is busy: {len(self.waiting)} requests are already waiting "
                f"(max_waiting_requests={limit}); retry in {retry_after:.0f} s",
                retry_after_seconds=retry_after)
        request.max_tokens = max_tokens
        request.status = RequestStatus.WAITING
        now = self.clock()
        request.stats.queued_time = now
        request.queue_key = self.queue_keys.key(request.priority, now)
        if self.trace_requests:
            request.trace = RequestTrace(request.arrival_time)
            request.trace.queued(now, len(self.waiting))
            self._queue_changed = True
        self.requests[request.request_id] = request
        self.waiting.push(request)

    # ------------------------------------------------------------------ scheduling
    def schedule(self) -> SchedulerOutput:
        budget = self.scheduler_config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_requests: list[NewRequestData] = []
        cached_requests = CachedRequestData()
        preempted: set[str] = set()
        now = self.clock()
        step = self.num_steps
        tracing = self.trace_requests

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens_to_compute, budget)
            assert num_new > 0, f"running {request} has nothing to compute"
            num_known_blocks = len(request.block_ids)  # the runner holds these already
            if not self._allocate_or_preempt(request, num_new, preempted, now):
                break  # it had to preempt itself: nobody after it is left either
            # A decode step (one token after a fully computed sequence) is not traced.
            if tracing and (num_new > 1 or not request.output_token_ids
                            or request.num_computed_tokens + 1 < request.num_tokens):
                request.trace.prefill(now, request.num_computed_tokens, num_new)
            num_scheduled[request.request_id] = num_new
            cached_requests.append(request.request_id,
                                   request.all_token_ids[request.num_runner_tokens:],
                                   request.block_ids[num_known_blocks:],
                                   request.num_computed_tokens)
            request.num_runner_tokens = request.num_tokens
            budget -= num_new
            index += 1

        # Admitting while preempting would only take blocks the running ones need next step.
        max_num_seqs = self.scheduler_config.max_num_seqs
        kv_short: dict[str, int] | None = None
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < max_num_seqs:
                request = self.waiting.peek()
                hit = (self.block_manager.get_computed_blocks(request)
                       if request.reads_prefix_cache else ComputedBlocks())
                num_new = min(request.num_tokens - hit.num_tokens, budget)
                admitted = self.block_manager.allocate_slots(request, num_new, hit)
                if not admitted and hit.copy_source is not None and not self.running:
                    # A whole-prompt hit copies its last block, which holds the source beside the
                    # copy: one block more than the prompt needs. In a pool with no block to
                    # spare (and nobody running to free one) that would wait for ever, so the
                    # last block's tokens are computed again instead.
                    block_size = self.block_manager.block_size
                    hit = ComputedBlocks(hit.block_ids, len(hit.block_ids) * block_size)
                    num_new = min(request.num_tokens - hit.num_tokens, budget)
                    admitted = self.block_manager.allocate_slots(request, num_new, hit)
                if not admitted:
                    if tracing:
                        kv_short = self._admission_shortfall(hit, num_new)
                    break  # nobody jumps the head of the queue
                self.waiting.pop()
                request.num_computed_tokens = hit.num_tokens
                resumed = request.stats.first_scheduled_time is not None
                if not resumed:
                    request.stats.first_scheduled_time = now
                    request.num_cached_tokens = hit.num_tokens
                if tracing:
                    request.trace.admitted(now, step, hit.num_tokens, resumed)
                    request.trace.prefill(now, hit.num_tokens, num_new)
                request.status = RequestStatus.RUNNING
                insert_running(self.running, request)
                num_scheduled[request.request_id] = num_new
                new_requests.append(_new_request_data(request))
                request.num_runner_tokens = request.num_tokens
                budget -= num_new

        if tracing:
            if not self.waiting:
                self._wait_cause = None
            elif preempted:
                self._note_waits(PREEMPTING, self._preempt_numbers, now, step)
            elif kv_short is not None:
                self._note_waits(KV_BLOCKS_SHORT, kv_short, now, step)
            elif len(self.running) >= max_num_seqs:
                self._note_waits(BATCH_FULL, {"max_num_seqs": max_num_seqs}, now, step)
            else:
                self._note_waits(TOKEN_BUDGET_SPENT, {
                    "token_budget": self.scheduler_config.max_num_batched_tokens,
                    "num_scheduled": len(num_scheduled)}, now, step)

        total = sum(num_scheduled.values())
        self.num_steps += 1
        self._last_num_batched_tokens = total
        self._last_batch_size = len(num_scheduled)
        if total == 0:
            # An empty step never reaches the runner: what it must forget waits for the next.
            self._finished_since_last_step |= preempted
            return SchedulerOutput(num_scheduled_tokens={}, total_num_scheduled_tokens=0)
        finished = self._finished_since_last_step
        self._finished_since_last_step = set()
        return SchedulerOutput(
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=total,
            scheduled_new_requests=new_requests,
            scheduled_cached_requests=cached_requests,
            block_copies=self.block_manager.take_block_copies(),
            finished_request_ids=finished,
            preempted_request_ids=preempted,
        )

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: set[str],
                             now: float) -> bool:
        """Find blocks for a running request, preempting the running ones with the worst keys
        (least urgent, then latest arrived) if needed."""
        bm = self.block_manager
        while not bm.allocate_slots(request, num_new):
            # Victims come from the tail, at or behind `request`, so none was scheduled this step.
            victim = self.running.pop()
            if self.trace_requests:
                needed = (bm.num_blocks_for_tokens(request.num_computed_tokens + num_new)
                          - len(request.block_ids))
                free = bm.num_free_blocks
                self._preempt_numbers = {"blocks_needed": needed, "blocks_free": free}
                victim.trace.preempted(now, request.request_id, needed, free,
                                       victim.num_computed_tokens)
                self._queue_changed = True
            self._preempt(victim)
            preempted.add(victim.request_id)
            if victim is request:
                return False
        return True

    def _admission_shortfall(self, hit: ComputedBlocks, num_new: int) -> dict[str, int]:
        """The numbers behind a failed admission: blocks it needs beyond its prefix hit, and the
        free blocks it could take (hit blocks nobody holds sit in the free queue but are its own).
        """
        bm = self.block_manager
        needed = bm.num_blocks_for_tokens(hit.num_tokens + num_new) - len(hit.block_ids)
        num_revived = sum(1 for block_id in hit.block_ids if bm.blocks[block_id].ref_cnt == 0)
        return {"blocks_needed": needed, "blocks_free": bm.num_free_blocks - num_revived}

    def _note_waits(self, reason: str, numbers: dict[str, int], now: float, step: int) -> None:
        """Every request still waiting after this step's admissions waits for ``reason``.

        Runs of steps with the same reason share one WaitCause, so the loop over the queue only
        runs when the reason changed or someone joined the queue."""
        cause = self._wait_cause
        if cause is not None and cause.reason == reason:
            cause.numbers = numbers
            cause.last_step = step
            if not self._queue_changed:
                return
        else:
            cause = self._wait_cause = WaitCause(reason, numbers, step)
        self._queue_changed = False
        for num_ahead, request in enumerate(self.waiting):
            if request.trace.open_wait is not cause:
                request.trace.wait(cause, now, step, num_ahead)

    def _preempt(self, request: Request) -> None:
        # The runner forgets it (preempted_request_ids); it is sent again in full when resumed.
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.stats.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.push(request)  # under its old key: ahead of everyone who came after it

    # ------------------------------------------------------------------ results
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance progress, append sampled tokens, stop finished requests and free their blocks."""
        self.block_manager.end_step()
        now = self.clock()
        sampled = runner_output.sampled_token_ids
        logprobs = runner_output.logprobs or {}
        outputs: list[EngineCoreOutput] = []
        for request_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            # Every request scheduled is RUNNING until the step ends; one that is not was aborted
            # while the step ran (its blocks are already free), or its id was reused since.
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += num_scheduled
            self._collect_prompt_outputs(request, runner_output)
            if request.is_prompt_only and request.num_computed_tokens == request.num_tokens:
                outputs.append(self._finish_prompt_only(request, now))
                continue
            token_id = sampled.get(request_id)
            if token_id is None:
                assert request.num_computed_tokens < request.num_tokens, (
                    f"runner sampled no token for {request}, whose prompt is fully computed")
                continue
            assert request.num_computed_tokens == request.num_tokens, (
                f"runner sampled a token for {request} in the middle of its prompt")
            request.append_output_token_id(token_id)
            if request.stats.first_token_time is None:
                request.stats.first_token_time = now
                if request.trace is not None:
                    request.trace.first_token(now)
            request.stats.last_token_time = now
            status = self._check_stop(request, token_id)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status, now)
            outputs.append(EngineCoreOutput(
                request_id=request_id,
                new_token_ids=[token_id],
                finish_reason=request.finish_reason,
                stop_reason=request.stop_reason,
                logprobs=logprobs.get(request_id),
                num_cached_tokens=request.num_cached_tokens,
                prompt_logprobs=self._take_prompt_logprobs(request),
            ))
        return outputs

    @staticmethod
    def _collect_prompt_outputs(request: Request, runner_output: RunnerOutput) -> None:
        """Append this step's prompt rows (logprobs, pooled sums) to the request."""
        rows = runner_output.prompt_logprobs.get(request.request_id)
        if rows:
            request.prompt_logprobs.extend(rows)
            request.num_prompt_logprobs += len(rows)
        pooled = runner_output.pooled.get(request.request_id)
        if pooled is not None:
            if request.pooling == "mean" and request.pooled is not None:
                request.pooled = [a + b for a, b in zip(request.pooled, pooled)]
            else:
                request.pooled = pooled

    @staticmethod
    def _take_prompt_logprobs(request: Request) -> list | None:
        """The prompt's scores, handed over once (the first output after the prompt ends)."""
        if request.sampling_params.prompt_logprobs is None or request.num_output_tokens > 1:
            return None
        rows, request.prompt_logprobs = request.prompt_logprobs, []
        return rows

    def _finish_prompt_only(self, request: Request, now: float) -> EngineCoreOutput:
        """A request with nothing to sample ends when its prompt is computed: "length" for
        max_tokens 0 (what OpenAI answers to echo with max_tokens 0), "stop" for pooling."""
        pooled = request.pooled
        if request.pooling == "mean" and pooled is not None:
            pooled = [value / request.num_prompt_tokens for value in pooled]
        status = (RequestStatus.FINISHED_STOPPED if request.pooling is not None
                  else RequestStatus.FINISHED_LENGTH)
        if request.stats.first_token_time is None:
            request.stats.first_token_time = now
        request.stats.last_token_time = now
        self.running.remove(request)
        self._finish(request, status, now)
        return EngineCoreOutput(
            request_id=request.request_id, new_token_ids=[], finish_reason=request.finish_reason,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=self._take_prompt_logprobs(request), pooled=pooled)

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id == request.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        grammar = request.grammar
        if grammar is not None:
            if not grammar.accept(token_id):
                # Cannot happen while the sampler applies the mask; if it does, end this request
                # alone rather than emit output the grammar forbids.
                logger.error("request %s: token %d broke its grammar (%s): %s; aborting it",
                             request.request_id, token_id, grammar.describe, grammar.error)
                return RequestStatus.FINISHED_ABORTED
            if grammar.is_finished:
                return RequestStatus.FINISHED_STOPPED
        assert request.max_tokens is not None
        if (request.num_output_tokens >= request.max_tokens
                or request.num_tokens >= self.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus, now: float) -> None:
        assert status.is_finished, status
        self.block_manager.free(request)
        request.status = status
        request.stats.finished_time = now
        if request.trace is not None:
            request.trace.finished(now, self.num_steps, status.finish_reason,
                                   request.num_output_tokens)
        del self.requests[request.request_id]
        self._finished_since_last_step.add(request.request_id)
        self.drain_rate.record_finished(now)

    # ------------------------------------------------------------------ frontend-driven finish
    def finish_requests(self, request_ids: str | Iterable[str],
                        status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                        stop_reason: int | str | None = None) -> list[Request]:
        """Finish requests from outside (abort, or a stop string found by the detokenizer).

        Their blocks are freed at once. Unknown or already finished ids are ignored: an abort may
        race with a request finishing on its own. Returns the requests actually finished.
        """
        assert status.is_finished, status
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        now = self.clock()
        finished: list[Request] = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            if stop_reason is not None:
                request.stop_reason = stop_reason
            self._finish(request, status, now)
            finished.append(request)
        return finished

    # ------------------------------------------------------------------ introspection
    def scheduled_requests(self, scheduler_output: SchedulerOutput) -> list[Request]:
        """The live requests of a step, in batch order (engine side only: never sent)."""
        return [self.requests[request_id] for request_id in scheduler_output.num_scheduled_tokens
                if request_id in self.requests]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=bm.usage,
            num_batched_tokens=self._last_num_batched_tokens,
            batch_size=self._last_batch_size,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_steps=self.num_steps,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
        )

    def check_no_leaks(self) -> None:
        """Once every request is done, every block must be free (see BlockManager)."""
        assert not self.requests, f"unfinished requests remain: {list(self.requests)[:10]}"
        self.block_manager.check_no_leaks()


def _new_request_data(request: Request) -> NewRequestData:
    """A request the runner does not hold: first admission, or back from preemption."""
    return NewRequestData(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=list(request.output_token_ids),
        sampling_params=request.sampling_params,
        eos_token_id=request.eos_token_id,
        block_ids=list(request.block_ids),
        num_computed_tokens=request.num_computed_tokens,
        is_prompt_only=request.is_prompt_only,
        pooling=request.pooling,
        num_prompt_logprobs=request.num_prompt_logprobs,
    )
