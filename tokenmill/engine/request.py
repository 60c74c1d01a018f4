"""``Request``: the single unit of per-request state in the engine core.

Token ids, progress (``num_computed_tokens``), status, KV block ids, finish reason and stats all live
here; the scheduler and block manager read and update it, nothing else tracks a request's progress.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from tokenmill.engine.stats import RequestStats
from tokenmill.engine.token_progress import TokenProgress
from tokenmill.engine.trace import RequestTrace
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.layers.sampler import TokenLogprobs
    from tokenmill.structured_output.matcher import GrammarMatcher

POOLING_METHODS = ("last", "mean")
"""How a pooling (embedding) request turns its prompt's hidden states into one vector."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI ``finish_reason`` for a finished status, None otherwise."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request(TokenProgress):
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        grammar: GrammarMatcher | None = None,
        pooling: str | None = None,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.cache_salt = cache_salt
        self.output_token_ids: list[int] = []
        # Kept as its own list (not prompt + output on demand) because the runner and the prefix
        # hasher read it every step.
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.max_tokens: int | None = sampling_params.max_tokens
        """Resolved by the scheduler at admission (None in the params means up to the context)."""
        self.num_computed_tokens = 0
        """Tokens whose KV is in (or being written to) this request's blocks."""
        self.num_cached_tokens = 0
        """Tokens found in the prefix cache when the request was first scheduled."""
        self.num_runner_tokens = 0
        """How many of ``all_token_ids`` the model runner holds (sent in full when the request is
        scheduled as new, then as per-step diffs): the scheduler sends the rest next time."""
        self.status = RequestStatus.WAITING
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        """Hash-chain value of each full block of ``all_token_ids`` (filled by the block manager)."""
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that ended the request, if any."""
        self.stats = RequestStats(arrival_time=time.time() if arrival_time is None
                                  else arrival_time)
        self.trace: RequestTrace | None = None
        """Its scheduling timeline, created by the scheduler when request tracing is on."""
        self.grammar = grammar
        """Where its output is in its grammar (structured output); it has consumed exactly
        ``output_token_ids``. Touched on the engine thread only."""
        self.prompt_logprobs: list[TokenLogprobs] = []
        """Log probabilities of prompt tokens 1.. (``sampling_params.prompt_logprobs``), appended
        by each prefill chunk; handed to the frontend once, with the output that ends the prompt.
        Survives preemption, so a recomputed prompt only adds the rows it still lacks."""
        self.num_prompt_logprobs = 0
        """Prompt positions scored so far (including those already handed over)."""
        assert pooling is None or pooling in POOLING_METHODS, pooling
        self.pooling = pooling
        """An embedding request: no token is sampled; the prompt's final hidden states are pooled
        ("last" token or "mean" over the prompt) into ``pooled``."""
        self.pooled: list[float] | None = None
        """The pooled vector so far (mean pooling: the running sum of the computed rows)."""
        self.priority = priority
        """vLLM's convention: lower is more urgent, default 0 (``request_queue.py``)."""
        self.queue_key: tuple[float, int] | None = None
        """Its rank in the scheduler's waiting queue and running list, fixed when first queued
        (priority aged by arrival time, see ``request_queue.py``)."""

    @property
    def arrival_time(self) -> float:
        return self.stats.arrival_time

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prompt_only(self) -> bool:
        """Nothing to sample: it ends once its prompt is computed (max_tokens 0, or pooling)."""
        return self.pooling is not None or self.max_tokens == 0

    @property
    def reads_prefix_cache(self) -> bool:
        """Reusing cached KV skips those positions' forward pass; a request that needs every
        prompt row's output (prompt logprobs, mean pooling) must compute them, as vLLM does."""
        return self.sampling_params.prompt_logprobs is None and self.pooling != "mean"

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})")
