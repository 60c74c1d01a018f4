"""Replica-choice policies shared by the gateway's router and the Ray Serve request router.

Both route a request among replicas of one model; they differ only in where the replica list and
the loads come from (the gateway counts its own requests in flight over HTTP, the Ray router
counts the ones it routed). The policies are pure functions over items with a name and a load, so
they are tested once and behave the same in both:

- ``order_by_load``: least loaded first; ties rotate with ``turn`` so idle replicas share.
- ``prefix_affinity_order``: rendezvous hashing of a prefix key picks the replica likely to hold
  that prefix's KV; it goes first unless its load is ``max_imbalance`` or more above the least
  loaded one (the load cap, so one hot prefix cannot flood one replica). Rendezvous hashing moves
  only the prefixes of a replica that leaves, not everyone's.

``StragglerDetector`` marks a replica *degraded* when its step time, compared batch size bucket by
bucket with the median of the other replicas, stays above ``factor`` for ``persistence``
consecutive evaluations. ``straggler_order`` is then the one rule both routers apply: a degraded
replica takes only *overflow*. While any healthy replica holds fewer than ``capacity`` requests
in flight, the degraded ones go behind every healthy one (the gateway reaches them only when each
healthy replica failed this very request; the Ray router drops them), so they get no user
request; when every healthy
replica is full, a degraded one with room goes first; when every replica is degraded, the
policy's order stands (straggler marking never refuses a request).

Why overflow only, not "less traffic": a batching engine's latency barely grows with the number
of requests it holds, up to its batch size (``max_num_seqs``), so a request that joins a healthy
replica's batch costs almost nothing, while every request sent to a replica slowed 2x takes 2x
and sets the fleet's p99. Past the batch size, a new request waits for a slot on a healthy
replica, and a degraded replica with room is the better place for it.

A degraded replica that gets no traffic runs no steps, so its step times (a window of the last
few seconds) would stop moving and it could never be cleared. The routers therefore send each
degraded replica a small *probe* now and then (``PROBE_*``: a few greedy tokens, labelled, not
counted as user traffic); its decode steps are single-request steps (batch bucket 1), and the
detector remembers each replica's last figure per bucket, so the probe's steps are compared
with the healthy replicas' single-request steps even while those are busy with larger batches
(a remembered figure counts only for a degraded replica, in a bucket no other replica ran
lately).
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def order_by_load(items: Sequence[T], load: Callable[[T], float], turn: int) -> list[T]:
    """Least loaded first; equal loads start at position ``turn`` and rotate."""
    n = len(items)
    ranked = sorted(range(n), key=lambda i: (load(items[i]), (i - turn) % n))
    return [items[i] for i in ranked]


def affinity_owner(items: Sequence[T], name: Callable[[T], str], key: str) -> T:
    """The item whose rendezvous weight for ``key`` is highest (stable as items come and go)."""
    return max(items, key=lambda item: hashlib.sha256(f"{name(item)}\0{key}".encode()).digest())


def prefix_affinity_order(items: Sequence[T], name: Callable[[T], str],
                          load: Callable[[T], float], key: str, turn: int,
                          max_imbalance: float) -> tuple[list[T], bool]:
    """The key's owner first (then the rest by load), or plain load order when the owner is
    ``max_imbalance`` or more above the least loaded; the flag says the cap was hit."""
    by_load = order_by_load(items, load, turn)
    owner = affinity_owner(items, name, key)
    if load(owner) - load(by_load[0]) >= max_imbalance:
        return by_load, True
    return [owner] + [item for item in by_load if item is not owner], False


def straggler_order(ordered: Sequence[T], is_degraded: Callable[[T], bool],
                    load: Callable[[T], float], capacity: float) -> tuple[list[T], bool]:
    """The policy's ``ordered`` replicas with the overflow-only rule applied (module docstring).

    ``capacity``: requests in flight at which a healthy replica is full. Returns the new order
    and whether this request is overflow (a degraded replica comes first, healthy ones exist)."""
    degraded = [item for item in ordered if is_degraded(item)]
    healthy = [item for item in ordered if not is_degraded(item)]
    if not degraded or not healthy:
        return list(ordered), False
    if any(load(item) < capacity for item in healthy):
        return healthy + degraded, False
    with_room = sorted((item for item in degraded if load(item) < capacity), key=load)
    full = [item for item in degraded if item not in with_room]
    return with_room + healthy + full, bool(with_room)


PROBE_PROMPT = "Recovery probe: count to ten. One, two,"
"""The prompt of a straggler-recovery probe (a few tokens; any replica answers it)."""
PROBE_MAX_TOKENS = 8
"""Tokens a probe generates. One token would be a single (prefill) step; the detector needs
``StragglerPolicy.min_steps`` (5) steps of one bucket, so a probe decodes 7 single-request steps
(bucket 1) after its prefill: enough for one probe to give a fresh median."""
PROBE_HEADER = "x-tokenmill-probe"
"""HTTP header marking a probe (value: ``straggler-recovery``), for the upstream's logs."""


def probe_body(model: str) -> dict[str, object]:
    """The OpenAI ``/v1/completions`` body of a probe (greedy; ``ignore_eos`` so it always
    runs ``PROBE_MAX_TOKENS`` steps)."""
    return {"model": model, "prompt": PROBE_PROMPT, "max_tokens": PROBE_MAX_TOKENS,
            "temperature": 0, "ignore_eos": True}


def batch_bucket(num_batched_tokens: int) -> int:
    """Steps are comparable when their token counts share a power-of-two bucket (1, 2, 4, ...):
    a step's time grows with the tokens it computes."""
    return 1 << max(0, int(num_batched_tokens) - 1).bit_length()


@dataclass
class StragglerPolicy:
    factor: float = 1.3
    """A replica whose step time is above this many times the others' median is slow."""
    persistence: int = 3
    """Consecutive slow (or healthy) evaluations before it is marked degraded (or cleared)."""
    min_steps: int = 5
    """Steps a bucket needs on a replica before its median step time counts."""


@dataclass
class StragglerDetector:
    """Fed each replica's median step time per bucket (``update``), once per evaluation."""

    policy: StragglerPolicy = field(default_factory=StragglerPolicy)
    on_change: Callable[[str, bool, float], None] | None = None
    """Called with (replica, degraded, slowdown) when a replica is marked or cleared."""
    slowdown: dict[str, float] = field(default_factory=dict)
    """Latest ratio of each replica's step time to the others' median (1.0 = typical)."""
    degraded: set[str] = field(default_factory=set)
    _streak: dict[str, int] = field(default_factory=dict)
    _last_seen: dict[str, dict[int, float]] = field(default_factory=dict)
    """Replica -> bucket -> its latest usable median. Used only to judge a *degraded* replica,
    and only for a bucket no other replica ran in this evaluation: a busy replica that ran no
    single-request step lately still gives a probed replica something to compare with. Fresh
    figures come first because they were taken under the same load on shared hardware; a
    remembered one may not have been, so it never marks a healthy replica (it can only keep a
    degraded one marked, or clear it)."""
    _judged_at_steps: dict[str, int] = field(default_factory=dict)
    """Replica -> its cumulative step count when it was last judged (see ``update``)."""

    def update(self, step_seconds: Mapping[str, Mapping[int, tuple[float, int]]],
               num_steps: Mapping[str, int | None] | None = None) -> None:
        """``step_seconds[replica][bucket] = (median seconds, num steps)``.

        ``num_steps[replica]``: its engine's cumulative step count, when known. A replica that
        ran no step since it was last judged brings no new evidence, so it is not judged again:
        persistence then counts evaluations with fresh steps, and an idle replica's unchanged
        window (one noisy moment) cannot mark it by being re-read ``persistence`` times."""
        for gone in set(self.slowdown) - set(step_seconds):
            self.slowdown.pop(gone, None)
            self._streak.pop(gone, None)
            self.degraded.discard(gone)
        for gone in set(self._last_seen) - set(step_seconds):
            del self._last_seen[gone]
        for gone in set(self._judged_at_steps) - set(step_seconds):
            del self._judged_at_steps[gone]
        usable = {replica: {b: s for b, (s, n) in buckets.items() if n >= self.policy.min_steps}
                  for replica, buckets in step_seconds.items()}
        for replica, buckets in usable.items():
            self._last_seen.setdefault(replica, {}).update(buckets)
        for replica, buckets in usable.items():
            ratios = []
            for bucket, seconds in buckets.items():
                others = [b[bucket] for r, b in usable.items() if r != replica and bucket in b]
                if not others and replica in self.degraded:
                    # A degraded replica's probes: the others' last figures stand in (a healthy
                    # replica is judged on fresh comparisons only, so no stale figure marks it)
                    others = [b[bucket] for r, b in self._last_seen.items()
                              if r != replica and bucket in b]
                if others and seconds > 0:
                    ratios.append(seconds / statistics.median(others))
            if not ratios:
                continue  # nothing comparable yet: keep its state
            slowdown = statistics.median(ratios)
            self.slowdown[replica] = slowdown
            steps = (num_steps or {}).get(replica)
            if steps is not None:
                if self._judged_at_steps.get(replica) == steps:
                    continue  # no step since its last judgement: nothing new to judge
                self._judged_at_steps[replica] = steps  # (!=, not >: a restarted engine counts)
            self._judge(replica, slowdown > self.policy.factor, slowdown)

    def _judge(self, replica: str, is_slow: bool, slowdown: float) -> None:
        was_degraded = replica in self.degraded
        if is_slow == was_degraded:
            self._streak[replica] = 0
            return
        self._streak[replica] = self._streak.get(replica, 0) + 1
        if self._streak[replica] < self.policy.persistence:
            return
        self._streak[replica] = 0
        if is_slow:
            self.degraded.add(replica)
            logger.warning("replica %s is degraded: its steps take %.2fx the other replicas' "
                           "median for comparable batches (threshold %.2fx); it now gets "
                           "user requests only as overflow (every healthy replica full), and "
                           "recovery probes", replica, slowdown, self.policy.factor)
        else:
            self.degraded.discard(replica)
            logger.warning("replica %s recovered: its steps take %.2fx the other replicas' "
                           "median", replica, slowdown)
        if self.on_change is not None:
            self.on_change(replica, is_slow, slowdown)
