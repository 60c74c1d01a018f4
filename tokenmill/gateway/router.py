"""Replicas, routing policies, active health checks and the circuit breaker.

A policy orders the routable replicas of a model; the upstream stage tries them in that order, so
the order is also the retry plan. Policies live in a small registry:

- ``least_outstanding``: fewest requests in flight first (ties rotate, so idle replicas share).
- ``round_robin``: rotate.
- ``prefix_affinity``: rendezvous hashing of the prompt's first characters, so one prefix keeps
  landing on one replica (whose KV prefix cache then hits), unless that replica has
  ``affinity_max_imbalance`` more requests in flight than the least busy one. Rendezvous hashing
  moves only the prefixes of a replica that leaves, not everyone's.

After ``failure_threshold`` consecutive failures a replica's circuit opens for ``cooldown_s``;
afterwards it is half-open: exactly one request (the probe) is let through, the others go to
another replica or fail fast until the probe's answer starts (closes the circuit) or fails
(re-opens it at once). A probe that ends without a verdict (a 4xx, a caller gone) frees the
slot for the next request.

Stragglers (``stragglers.StragglerWatch`` keeps ``degraded``): the policy orders the healthy
replicas, then ``routing_policy.straggler_order`` (the rule the Ray Serve router applies too) puts
a degraded replica first only when every healthy one holds ``replica_capacity`` requests or more
(overflow), else last in the plan (reached only if every healthy replica failed this request).
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tokenmill.gateway.config import RoutingSection, UpstreamSection
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.routing_policy import order_by_load, prefix_affinity_order, straggler_order


@dataclass
class Replica:
    name: str
    url: str
    configured_models: list[str]
    discovered_models: list[str] = field(default_factory=list)
    outstanding: int = 0
    healthy: bool = True
    consecutive_failures: int = 0
    open_until: float = 0.0
    probe: object | None = None
    """While half-open: the token of the one attempt in flight (the probe), else None."""

    @property
    def models(self) -> list[str]:
        return self.configured_models or self.discovered_models

    def serves(self, model: str) -> bool:
        # A replica whose models are not known yet is tried rather than ruled out.
        return not self.models or any(fnmatch.fnmatchcase(model, m) for m in self.models)

    def can_route(self, now: float) -> bool:
        return self.healthy and self.open_until <= now

    def is_half_open(self, now: float) -> bool:
        return self.open_until != 0.0 and self.open_until <= now

    def can_take(self, now: float) -> bool:
        """Whether a new request may be sent now (half-open: only while no probe is out)."""
        return self.can_route(now) and not (self.probe is not None and self.is_half_open(now))


Policy = Callable[["Router", list[Replica], str], list[Replica]]


def _least_outstanding(router: Router, replicas: list[Replica], key: str) -> list[Replica]:
    return order_by_load(replicas, lambda r: r.outstanding, router.next_turn())


def _round_robin(router: Router, replicas: list[Replica], key: str) -> list[Replica]:
    start = router.next_turn() % len(replicas)
    return replicas[start:] + replicas[:start]


def _prefix_affinity(router: Router, replicas: list[Replica], key: str) -> list[Replica]:
    ordered, capped = prefix_affinity_order(replicas, lambda r: r.name, lambda r: r.outstanding,
                                            key, router.next_turn(),
                                            router.section.affinity_max_imbalance)
    router.num_affinity_fallbacks += capped
    return ordered


POLICIES: dict[str, Policy] = {
    "least_outstanding": _least_outstanding,
    "round_robin": _round_robin,
    "prefix_affinity": _prefix_affinity,
}


class Router:
    def __init__(self, upstreams: list[UpstreamSection], section: RoutingSection,
                 metrics: GatewayMetrics) -> None:
        self.replicas = [Replica(u.name, u.url.rstrip("/"), list(u.models)) for u in upstreams]
        self.section = section
        self.policy = POLICIES[section.policy]
        self.metrics = metrics
        self._turn = 0
        self.num_affinity_fallbacks = 0
        self.degraded: set[str] = set()
        """Replicas marked stragglers (kept by ``stragglers.StragglerWatch``)."""
        for r in self.replicas:
            self._publish(r)

    def next_turn(self) -> int:
        self._turn += 1
        return self._turn

    def all_models(self) -> list[str]:
        return sorted({m for r in self.replicas for m in r.models if "*" not in m})

    def knows_model(self, model: str) -> bool:
        return any(r.serves(model) for r in self.replicas)

    def plan(self, model: str, prompt: str) -> list[Replica]:
        """The replicas to try for this request, best first (empty: none routable now)."""
        now = time.monotonic()
        usable = [r for r in self.replicas if r.serves(model) and r.can_take(now)]
        if not usable:
            return []
        key = prompt[:self.section.prefix_chars]
        if not self.degraded:
            return self.policy(self, usable, key)[:self.section.max_attempts]
        # The policy ranks the healthy replicas (a degraded one's prefixes move to them), then
        # the straggler rule places the degraded ones.
        healthy = [r for r in usable if r.name not in self.degraded] or usable
        ordered = self.policy(self, healthy, key) + [r for r in usable if r not in healthy]
        ordered, _ = straggler_order(ordered, lambda r: r.name in self.degraded,
                                     lambda r: r.outstanding, self.section.replica_capacity)
        return ordered[:self.section.max_attempts]

    def acquire(self, replica: Replica, attempt: object) -> bool:
        """Claim ``replica`` for ``attempt`` (any unique object); False when it cannot take one
        now (circuit open, or half-open with its probe already out). Every True is followed by
        ``release(replica, attempt)``."""
        now = time.monotonic()
        if not replica.can_take(now):
            return False
        if replica.is_half_open(now):
            replica.probe = attempt  # the probe; the others wait for its verdict
        if replica.name in self.degraded:
            self.metrics.upstream_degraded_requests.labels(replica.name).inc()
        return True

    def release(self, replica: Replica, attempt: object) -> None:
        """``attempt`` is over; a probe without a verdict leaves the circuit half-open, free for
        the next request to probe."""
        if replica.probe is attempt:
            replica.probe = None

    def record_success(self, replica: Replica) -> None:
        replica.consecutive_failures = 0
        replica.open_until = 0.0
        replica.probe = None
        self._publish(replica)

    def record_failure(self, replica: Replica, kind: str) -> None:
        self.metrics.upstream_errors.labels(replica.name, kind).inc()
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.section.failure_threshold:
            replica.open_until = time.monotonic() + self.section.cooldown_s
        replica.probe = None
        self._publish(replica)

    def _publish(self, replica: Replica) -> None:
        routable = replica.can_route(time.monotonic())
        self.metrics.upstream_healthy.labels(replica.name).set(1 if routable else 0)

    async def check_all(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self._check(client, r) for r in self.replicas))

    async def _check(self, client: httpx.AsyncClient, replica: Replica) -> None:
        timeout = self.section.connect_timeout_s
        try:
            resp = await client.get(replica.url + self.section.health_path, timeout=timeout)
            replica.healthy = resp.status_code == 200
            if replica.healthy and not replica.configured_models:
                models = await client.get(replica.url + "/v1/models", timeout=timeout)
                if models.status_code == 200:
                    replica.discovered_models = [m["id"] for m in models.json().get("data", [])
                                                 if isinstance(m, dict) and "id" in m]
        except (httpx.HTTPError, ValueError):
            replica.healthy = False
        if not replica.healthy:
            self.metrics.upstream_errors.labels(replica.name, "health_check").inc()
        self._publish(replica)

    async def health_loop(self, client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.sleep(self.section.health_check_interval_s)
            await self.check_all(client)
