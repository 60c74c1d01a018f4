"""A bounded in-memory history of the server's figures, sampled about once a second.

The dashboard (``GET /dashboard``) polls ``GET /dashboard/data``, which reads this history. Two
things feed it:

* an engine output listener (``on_step``, once per engine step on the event loop) that adds up
  prompt and generated tokens and, when a request finishes, keeps its latencies: work per step is
  proportional to the step's outputs, never to the history;
* ``run()``, an asyncio task that every ``interval_s`` turns those sums into one ``point`` (rates,
  TTFT / TPOT percentiles over a sliding window, the engine's gauges and counters, cost per 1M
  tokens) and appends it to a ring buffer of ``num_points``.

Everything is bounded: the ring buffer, the latencies of the window (``max_window_requests``), the
recent finished requests the slowest are picked from (``num_recent``, however old), and the per-request token counts (requests
aborted by the frontend never finish here, so the oldest counts are dropped past a cap). A poll
asks for the points after the last sequence number it has (``since``), so a page that keeps
polling costs one or two points per request, whatever the history's length.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.server.cost_metrics import CostTracker

_MAX_TRACKED_REQUESTS = 65536
"""Per-request token counts kept for unfinished requests; past it the oldest are forgotten."""


@dataclass(frozen=True)
class FinishedRequest:
    request_id: str
    finished_at: float
    """Wall-clock seconds (the engine's timestamp of the step that finished it)."""
    ttft_s: float | None
    tpot_s: float | None
    """Mean decode time per output token after the first (None for a single token)."""
    e2e_s: float | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    finish_reason: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.request_id, "finished_at": self.finished_at, "ttft_s": self.ttft_s,
                "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
                "prompt_tokens": self.num_prompt_tokens, "cached_tokens": self.num_cached_tokens,
                "generated_tokens": self.num_generated_tokens,
                "finish_reason": self.finish_reason,
                "trace_url": f"/v1/requests/{self.request_id}/trace"}


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = math.ceil(q * len(sorted_values) / 100)  # 1-based: the smallest covering q percent
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


class StatsHistory:
    def __init__(self, *, interval_s: float = 1.0, num_points: int = 600,
                 window_s: float = 60.0, max_window_requests: int = 4096,
                 num_recent: int = 256, num_slowest: int = 10) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.num_slowest = num_slowest
        self.points: deque[dict[str, Any]] = deque(maxlen=num_points)
        self._engine: AsyncLLM | None = None
        self._cost: CostTracker | None = None
        self._seq = 0
        # Sums since the previous point, filled by on_step.
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._num_finished = 0
        # Generated tokens per unfinished request and choice (outputs may carry only deltas).
        self._tokens_by_request: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._window: deque[FinishedRequest] = deque(maxlen=max_window_requests)
        self._recent: deque[FinishedRequest] = deque(maxlen=num_recent)
        self._last_sample_time: float | None = None
        self._last_counters: tuple[int, int, int] | None = None  # preemptions, queries, hits
        self._prefix_window: deque[tuple[float, int, int]] = deque()
        self._slowest: list[FinishedRequest] = []

    @property
    def model_name(self) -> str | None:
        return self._engine.model_name if self._engine is not None else None

    def bind(self, engine: AsyncLLM, cost: CostTracker | None) -> None:
        self._engine = engine
        self._cost = cost
        if self._last_sample_time is None:  # the first point's rates count from here, not None
            self._last_sample_time = time.time()

    # ------------------------------------------------------------------ engine listener
    def on_step(self, outputs: list[RequestOutput], now: float) -> None:
        for output in outputs:
            counts = self._tokens_by_request.get(output.request_id)
            if counts is None:
                counts = self._tokens_by_request[output.request_id] = {}
                self._num_prompt_tokens += len(output.prompt_token_ids)
                if len(self._tokens_by_request) > _MAX_TRACKED_REQUESTS:
                    self._tokens_by_request.popitem(last=False)
            for completion in output.outputs:
                num_new = len(completion.delta_token_ids)
                if num_new:
                    counts[completion.index] = counts.get(completion.index, 0) + num_new
                    self._num_generated_tokens += num_new
            if output.finished:
                self._tokens_by_request.pop(output.request_id, None)
                finished = _finished(output, counts, now)
                self._window.append(finished)
                self._recent.append(finished)
                self._num_finished += 1

    # ------------------------------------------------------------------ sampling
    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    def sample(self, now: float | None = None) -> dict[str, Any] | None:
        """Append one point (nothing before the engine is bound) and return it."""
        if self._engine is None:
            return None
        now = time.time() if now is None else now
        elapsed = now - self._last_sample_time if self._last_sample_time is not None else None
        self._last_sample_time = now
        stats = self._engine.get_stats()
        counters = (stats.num_preemptions, stats.prefix_cache_queries, stats.prefix_cache_hits)
        previous = self._last_counters or counters
        self._last_counters = counters

        while self._window and self._window[0].finished_at < now - self.window_s:
            self._window.popleft()
        ttfts = sorted(r.ttft_s for r in self._window if r.ttft_s is not None)
        tpots = sorted(r.tpot_s for r in self._window if r.tpot_s is not None)
        e2es = sorted(r.e2e_s for r in self._window if r.e2e_s is not None)
        self._slowest = heapq.nlargest(self.num_slowest, self._recent,
                                       key=lambda r: r.e2e_s or 0.0)

        self._prefix_window.append((now, stats.prefix_cache_queries, stats.prefix_cache_hits))
        while self._prefix_window[0][0] < now - self.window_s:
            self._prefix_window.popleft()
        _, queries_then, hits_then = self._prefix_window[0]
        window_queries = stats.prefix_cache_queries - queries_then
        hit_rate = ((stats.prefix_cache_hits - hits_then) / window_queries
                    if window_queries else None)

        def per_second(count: int) -> float | None:
            return count / elapsed if elapsed else None

        cost = self._cost.per_million() if self._cost is not None else {}
        self._seq += 1
        point = {
            "seq": self._seq,
            "time": now,
            "output_tokens_per_s": per_second(self._num_generated_tokens),
            "prompt_tokens_per_s": per_second(self._num_prompt_tokens),
            "requests_finished": self._num_finished,
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99),
            "tpot_p50_s": percentile(tpots, 50),
            "tpot_p99_s": percentile(tpots, 99),
            "e2e_p50_s": percentile(e2es, 50),
            "e2e_p99_s": percentile(e2es, 99),
            "window_requests": len(self._window),
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "kv_cache_usage": stats.kv_cache_usage,
            "preemptions": counters[0] - previous[0],
            "preemptions_total": stats.num_preemptions,
            "prefix_cache_hit_rate": hit_rate,
            "prefix_cache_hit_rate_total": (stats.prefix_cache_hit_rate
                                            if stats.prefix_cache_queries else None),
            "cost_per_million_tokens": cost.get("all"),
            "cost_per_million_output_tokens": cost.get("decode"),
        }
        self._num_prompt_tokens = self._num_generated_tokens = self._num_finished = 0
        self.points.append(point)
        return point

    # ------------------------------------------------------------------ reading
    def points_since(self, since: int) -> list[dict[str, Any]]:
        """Points with ``seq > since``, oldest first; costs the number of points returned."""
        newer: list[dict[str, Any]] = []
        for point in reversed(self.points):
            if point["seq"] <= since:
                break
            newer.append(point)
        newer.reverse()
        return newer

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "max_points": self.points.maxlen,
            "latest_seq": self._seq,
            "points": self.points_since(since),
            "slowest_requests": [r.as_json() for r in self._slowest],
        }


def _finished(output: RequestOutput, counts: dict[int, int], now: float) -> FinishedRequest:
    """One entry per request: its first choice's timings, tokens summed over its choices."""
    stats = output.metrics[0] if output.metrics else None
    num_first = counts.get(output.outputs[0].index, 0) if output.outputs else 0
    tpot = None
    if (stats is not None and num_first > 1 and stats.first_token_time is not None
            and stats.last_token_time is not None):
        tpot = (stats.last_token_time - stats.first_token_time) / (num_first - 1)
    e2e = stats.e2e_seconds if stats is not None else None
    if e2e is None and stats is not None:
        e2e = now - stats.arrival_time
    reasons = sorted({c.finish_reason or "unknown" for c in output.outputs})
    return FinishedRequest(
        request_id=output.request_id, finished_at=now,
        ttft_s=stats.time_to_first_token if stats is not None else None, tpot_s=tpot,
        e2e_s=e2e, num_prompt_tokens=len(output.prompt_token_ids),
        num_cached_tokens=output.num_cached_tokens, num_generated_tokens=sum(counts.values()),
        finish_reason=",".join(reasons))
