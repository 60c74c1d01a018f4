"""Engine statistics: per request (timestamps, preemptions) and per scheduler step.

Timestamps are wall-clock seconds (``time.time()``) so that a frontend in another process and the
engine core agree on them; metrics and tracing turn them into intervals (queue time, TTFT, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.models.moe_stats import ExpertLoad


@dataclass
class RequestStats:
    arrival_time: float
    """When the frontend received the request."""
    queued_time: float | None = None
    """When the scheduler put it in the waiting queue."""
    first_scheduled_time: float | None = None
    """When it first got tokens in a step (later resumptions after preemption do not change it)."""
    first_token_time: float | None = None
    """When the first output token was sampled."""
    last_token_time: float | None = None
    """When the latest output token was sampled."""
    finished_time: float | None = None
    """When it finished, for any reason (stop, length, abort)."""
    num_preemptions: int = 0
    """Times its KV blocks were taken back to make room for older requests."""

    @property
    def queue_seconds(self) -> float | None:
        if self.first_scheduled_time is None or self.queued_time is None:
            return None
        return self.first_scheduled_time - self.queued_time

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_seconds(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot after a step; counters marked cumulative only grow (Prometheus counters)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    """Fraction of KV blocks held by requests, in [0, 1]."""
    num_batched_tokens: int
    """Tokens scheduled in the latest step."""
    batch_size: int
    """Requests scheduled in the latest step."""
    num_preemptions: int
    """Cumulative."""
    prefix_cache_queries: int
    """Cumulative, in tokens: prompt (+ output) tokens of admitted requests looked up."""
    prefix_cache_hits: int
    """Cumulative, in tokens: of those, tokens whose KV was found in the cache."""
    num_steps: int = 0
    """Cumulative number of schedule() calls."""
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    expert_load: ExpertLoad | None = None
    """MoE models only: cumulative tokens routed per layer and expert, and the load imbalance."""

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
