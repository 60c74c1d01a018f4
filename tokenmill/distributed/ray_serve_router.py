"""The deployment's Ray Serve request router: prefix affinity with a load cap, else least loaded,
and stragglers routed around (the policies themselves are ``tokenmill.routing_policy``, shared
with the gateway).

Ray builds one router per caller of the replica deployment: here, in each ingress replica (the
ingress calls the engine replicas through a ``DeploymentHandle`` with the parsed routing key, which
Ray's HTTP proxy could not give a router: it forwards only the ASGI scope, not the body).

- Load is the number of requests in flight on a replica from this process: counted up when Ray
  sends one (``on_send_request``) and down by the ingress when that replica's answer has ended
  (``FleetView.on_finished``). Ray's own signals were not usable for this: its completion
  callbacks and its replicas' ongoing-request counts both read zero while a streamed answer
  (every ingress call is one) is still running. Ray still refuses a replica whose queue is full
  (``max_ongoing_requests``) and moves to the next rank.
- Between choosing and sending Ray awaits (it probes the replicas' queues), so several requests
  arriving together would all be chosen against the same loads and land on one replica, past the
  load cap. Choosing therefore reserves the first-ranked replica (it counts in its load) until
  Ray sends a request there or ``RESERVATION_S`` passes (Ray sent it elsewhere).
- Every ``stats_period_s`` the router reads each replica's routing stats (``record_routing_stats``
  on the replica: step time per batch bucket, utilization, KV usage) and feeds the straggler
  detector. A degraded replica loses its prefixes to healthy replicas and takes only overflow
  (``routing_policy.straggler_order``): it is ranked first only when every healthy replica holds
  ``replica_capacity`` requests or more, else it is not ranked at all.
- Recovery probes (``ray_serve_probes``) are calls of the replica's ``probe`` method carrying
  ``probe_replica``: they go to exactly that replica and count as probes, not as routed requests
  or load.
- Each choice is matched to the request it was made for (no ``FIFOMixin``, as Ray's own
  prefix-aware router): with FIFO matching, a choice made for a probe or a prefix key could
  serve whichever request waited longest.
- ``FleetView.of_this_process()`` holds what the ingress reports on ``/ray/metrics`` and
  ``/ray/fleet``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from tokenmill.distributed.ray_serve_fleet import FleetView
from tokenmill.routing_policy import (
    StragglerDetector,
    StragglerPolicy,
    order_by_load,
    prefix_affinity_order,
    straggler_order,
)

logger = logging.getLogger("tokenmill.ray_serve")

RESERVATION_S = 2.0
"""How long a choice counts in its replica's load before Ray has sent the request there."""


def routing_key(pending_request: PendingRequest | None) -> str:
    """The prefix key the ingress put in the call's first argument (empty: no affinity)."""
    if pending_request is None or not pending_request.args:
        return ""
    first = pending_request.args[0]
    return first.get("routing_key", "") if isinstance(first, dict) else ""


def probe_target(pending_request: PendingRequest | None) -> str:
    """The replica id a recovery probe is for (empty: a user request)."""
    if pending_request is None or not pending_request.args:
        return ""
    first = pending_request.args[0]
    return first.get("probe_replica", "") if isinstance(first, dict) else ""


class TokenmillRequestRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix_affinity", affinity_max_imbalance: int = 4,
                         straggler_factor: float = 1.3, straggler_persistence: int = 3,
                         straggler_handling: bool = True, stats_period_s: float = 1.0,
                         replica_capacity: int = 32, **kwargs: Any) -> None:
        self.policy = policy
        self.affinity_max_imbalance = affinity_max_imbalance
        self.straggler_handling = straggler_handling
        self.replica_capacity = replica_capacity
        """Requests in flight at which a healthy replica is full (a degraded one then gets the
        overflow); ``RayServeSettings.resolved_replica_capacity``."""
        self.stats_period_s = stats_period_s
        self.detector = StragglerDetector(StragglerPolicy(straggler_factor, straggler_persistence),
                                          on_change=FleetView.of_this_process().on_change)
        self._turn = 0
        self._next_evaluation = 0.0
        self._reserved: dict[str, list[float]] = {}
        """Replica id -> when requests were chosen for it and not yet sent (oldest first)."""
        self._seen_stats: dict[str, int] = {}
        """Replica id -> the stats ``seq`` last fed to the detector (each snapshot counts once)."""
        self._probe_chosen_at: dict[str, float] = {}
        """Replica id -> when a probe was chosen for it and not yet sent (its send is no
        request). One at most: the ingress keeps one probe per replica in flight, and Ray may
        ask again for the same one (backoff), which must not count twice."""
        FleetView.of_this_process().router = self

    # ------------------------------------------------------------------ choosing
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        self._maybe_evaluate()
        target = probe_target(pending_request)
        probed = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        if probed:  # a recovery probe: that replica only, and it is no user request
            self._probe_chosen_at[target] = time.monotonic()
            return [probed]
        self._turn += 1
        key = routing_key(pending_request) if self.policy == "prefix_affinity" else ""
        ordered = self._order(candidate_replicas, key)
        self._reserved.setdefault(ordered[0].replica_id.unique_id, []).append(time.monotonic())
        # One replica per rank: Ray tries them in this order, skipping any whose queue is full.
        return [[replica] for replica in ordered]

    def _order(self, replicas: list[RunningReplica], key: str) -> list[RunningReplica]:
        degraded = self.detector.degraded if self.straggler_handling else set()
        # The policy ranks the healthy replicas (a degraded one's prefixes move to them); the
        # straggler rule then places the degraded ones.
        healthy = [r for r in replicas if r.replica_id.unique_id not in degraded] or replicas
        ordered = self._policy_order(healthy, key)
        ordered += order_by_load([r for r in replicas if r not in healthy], self._load,
                                 self._turn)
        ordered, overflow = straggler_order(ordered, lambda r: r.replica_id.unique_id in degraded,
                                            self._load, self.replica_capacity)
        if degraded and not overflow:
            # Left out, not ranked last: Ray falls through to the next rank whenever a busy
            # healthy replica is slow to answer its queue-length check, which would hand the
            # degraded replica user requests while the healthy ones have room. Ray retries
            # the choice instead (this router is asked again).
            ordered = [r for r in ordered if r.replica_id.unique_id not in degraded] or ordered
        return ordered

    def _policy_order(self, replicas: list[RunningReplica], key: str) -> list[RunningReplica]:
        if not key:
            return order_by_load(replicas, self._load, self._turn)
        ordered, capped = prefix_affinity_order(
            replicas, lambda r: r.replica_id.unique_id, self._load, key, self._turn,
            self.affinity_max_imbalance)
        if capped:
            FleetView.of_this_process().num_affinity_fallbacks += 1
        else:
            FleetView.of_this_process().num_affinity_hits += 1
        return ordered

    def _num_reserved(self, name: str) -> int:
        times = self._reserved.get(name)
        if not times:
            return 0
        expired = time.monotonic() - RESERVATION_S
        while times and times[0] < expired:
            times.pop(0)
        return len(times)

    def _load(self, replica: RunningReplica) -> float:
        name = replica.replica_id.unique_id
        return float(FleetView.of_this_process().in_flight.get(name, 0)
                     + self._num_reserved(name))

    # ------------------------------------------------------------------ bookkeeping
    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        name = replica_id.unique_id
        chosen_at = self._probe_chosen_at.pop(name, None)
        if chosen_at is not None and time.monotonic() - chosen_at < RESERVATION_S:
            # Ray tells only the replica; a user request sent to the same degraded replica
            # right then could take the probe's label (one request, counted as a probe).
            FleetView.of_this_process().on_probe(name)
            return
        if self._reserved.get(name):
            self._reserved[name].pop(0)  # now counted as in flight instead
        FleetView.of_this_process().on_sent(name, degraded=self.straggler_handling
                                            and name in self.detector.degraded)

    def probe_targets(self) -> list[str]:
        """The replicas due a recovery probe: the degraded ones, while handling is on (off,
        they get their share of user requests, whose steps move their figures)."""
        if not self.straggler_handling:
            return []
        # list() copies in one step: the ingress calls this from its own event loop's thread
        live = {r.replica_id.unique_id for r in list(self.curr_replicas.values())}
        return sorted(self.detector.degraded & live)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live_names = {r.replica_id.unique_id for r in replicas}
        for gone in set(FleetView.of_this_process().in_flight) - live_names:
            del FleetView.of_this_process().in_flight[gone]
        for gone in set(self._reserved) - live_names:
            del self._reserved[gone]
        for gone in set(self._probe_chosen_at) - live_names:
            del self._probe_chosen_at[gone]
        for name in set(FleetView.of_this_process().replicas) - live_names:
            del FleetView.of_this_process().replicas[name]

    # ------------------------------------------------------------------ stragglers
    def _maybe_evaluate(self) -> None:
        now = time.monotonic()
        if now < self._next_evaluation:
            return
        self._next_evaluation = now + self.stats_period_s
        self.evaluate()

    def evaluate(self) -> None:
        """Feed the replicas' new stats snapshots to the straggler detector; publish to FleetView.of_this_process()."""
        step_seconds: dict[str, dict[int, tuple[float, int]]] = {}
        num_steps: dict[str, int | None] = {}
        fresh = False
        for replica in self.curr_replicas.values():
            name = replica.replica_id.unique_id
            stats = replica.routing_stats or {}
            buckets = stats.get("step_seconds_by_bucket") or {}
            step_seconds[name] = {int(b): (float(s), int(n)) for b, (s, n) in buckets.items()}
            num_steps[name] = stats.get("num_steps")
            seq = int(stats.get("seq", -1))
            fresh |= seq != self._seen_stats.get(name)
            self._seen_stats[name] = seq
            FleetView.of_this_process().replicas[name] = {
                **stats, "outstanding": FleetView.of_this_process().in_flight.get(name, 0)}
        if fresh:
            self.detector.update(step_seconds, num_steps)
        for name, entry in FleetView.of_this_process().replicas.items():
            entry["degraded"] = name in self.detector.degraded
            entry["slowdown"] = self.detector.slowdown.get(name)
