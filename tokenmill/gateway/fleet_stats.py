"""The gateway's fleet figures over time, for its dashboard: a bounded history sampled each second.

Every ``interval_s`` the gateway's own Prometheus counters (its registry, read with ``collect()``,
so the cost follows the number of label sets, not the traffic) are turned into one point: requests
per second by outcome, cache hit rate, and for each upstream replica its mean latency to response
headers, requests in flight and whether it is routable. The ring buffer keeps ``num_points``; a
poll with ``since`` gets only the points after it. The replica table (health, circuit, failures)
is read from the router when asked, so it is never stale.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.router import Router


@dataclass
class _Counters:
    """Cumulative totals read from the gateway's metrics at one instant."""

    requests: float = 0.0
    by_status_class: dict[str, float] = field(default_factory=dict)  # "2xx", "4xx", "5xx"
    rate_limited: float = 0.0
    cache_hits: float = 0.0
    cache_lookups: float = 0.0
    guardrail_actions: float = 0.0
    latency_sum: dict[str, float] = field(default_factory=dict)  # by replica
    latency_count: dict[str, float] = field(default_factory=dict)
    upstream_errors: dict[str, float] = field(default_factory=dict)


def read_counters(metrics: GatewayMetrics) -> _Counters:
    c = _Counters()
    for family in metrics.registry.collect():
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == "tokenmill_gateway_requests_total":
                c.requests += value
                status_class = labels["status"][:1] + "xx"
                c.by_status_class[status_class] = c.by_status_class.get(status_class, 0) + value
            elif name == "tokenmill_gateway_ratelimit_rejections_total":
                c.rate_limited += value
            elif name == "tokenmill_gateway_cache_lookups_total":
                c.cache_lookups += value
                if labels["result"] == "hit":
                    c.cache_hits += value
            elif name == "tokenmill_gateway_guardrail_blocks_total":
                c.guardrail_actions += value
            elif name == "tokenmill_gateway_upstream_latency_seconds_sum":
                c.latency_sum[labels["replica"]] = value
            elif name == "tokenmill_gateway_upstream_latency_seconds_count":
                c.latency_count[labels["replica"]] = value
            elif name == "tokenmill_gateway_upstream_errors_total":
                replica = labels["replica"]
                c.upstream_errors[replica] = c.upstream_errors.get(replica, 0) + value
    return c


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


class FleetHistory:
    def __init__(self, metrics: GatewayMetrics, router: Router, *, interval_s: float = 1.0,
                 num_points: int = 600, window_s: float = 60.0) -> None:
        self.metrics = metrics
        self.router = router
        self.interval_s = interval_s
        self.window_s = window_s
        self.points: deque[dict[str, Any]] = deque(maxlen=num_points)
        self._seq = 0
        # Counted from creation (before the app serves), so the first point misses nothing.
        self._previous = (time.time(), read_counters(metrics))
        self._window: deque[tuple[float, _Counters]] = deque([self._previous])  # over window_s

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    def sample(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        counters = read_counters(self.metrics)
        then, before = self._previous
        self._previous = (now, counters)
        self._window.append((now, counters))
        while self._window[0][0] < now - self.window_s:
            self._window.popleft()
        elapsed = now - then

        def per_second(current: float, previous: float) -> float | None:
            return (current - previous) / elapsed if elapsed > 0 else None

        def status(c: _Counters, status_class: str) -> float:
            return c.by_status_class.get(status_class, 0.0)

        monotonic_now = time.monotonic()
        replicas = {}
        for r in self.router.replicas:
            num_answers = (counters.latency_count.get(r.name, 0)
                           - before.latency_count.get(r.name, 0))
            latency = (counters.latency_sum.get(r.name, 0)
                       - before.latency_sum.get(r.name, 0))
            replicas[r.name] = {"latency_s": latency / num_answers if num_answers else None,
                                "outstanding": r.outstanding,
                                "routable": r.can_route(monotonic_now)}
        self._seq += 1
        point = {
            "seq": self._seq,
            "time": now,
            "requests_per_s": per_second(counters.requests, before.requests),
            "ok_per_s": per_second(status(counters, "2xx"), status(before, "2xx")),
            "client_errors_per_s": per_second(status(counters, "4xx"), status(before, "4xx")),
            "server_errors_per_s": per_second(status(counters, "5xx"), status(before, "5xx")),
            "rate_limited_per_s": per_second(counters.rate_limited, before.rate_limited),
            "cache_hits_per_s": per_second(counters.cache_hits, before.cache_hits),
            "cache_hit_rate": _ratio(counters.cache_hits - before.cache_hits,
                                     counters.cache_lookups - before.cache_lookups),
            "replicas": replicas,
        }
        self.points.append(point)
        return point

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
        now = time.monotonic()
        latest = read_counters(self.metrics)
        oldest = self._window[0][1]
        replicas = []
        for r in self.router.replicas:
            num_answers = latest.latency_count.get(r.name, 0) - oldest.latency_count.get(r.name, 0)
            latency = latest.latency_sum.get(r.name, 0) - oldest.latency_sum.get(r.name, 0)
            replicas.append({
                "name": r.name, "url": r.url, "models": r.models,
                "routable": r.can_route(now), "healthy": r.healthy,
                "circuit_open_s": max(0.0, r.open_until - now),
                "consecutive_failures": r.consecutive_failures, "outstanding": r.outstanding,
                "answers_in_window": num_answers,
                "mean_latency_s": latency / num_answers if num_answers else None,
                "errors_total": latest.upstream_errors.get(r.name, 0),
                "degraded": r.name in self.router.degraded,
            })
        return {
            "policy": self.router.section.policy,
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "max_points": self.points.maxlen,
            "latest_seq": self._seq,
            "points": self.points_since(since),
            "replicas": replicas,
            "totals": {
                "requests": latest.requests,
                "by_status_class": latest.by_status_class,
                "rate_limited": latest.rate_limited,
                "cache_hits": latest.cache_hits,
                "cache_lookups": latest.cache_lookups,
                "cache_hit_rate": _ratio(latest.cache_hits, latest.cache_lookups),
                "guardrail_actions": latest.guardrail_actions,
                "affinity_fallbacks": self.router.num_affinity_fallbacks,
            },
        }
