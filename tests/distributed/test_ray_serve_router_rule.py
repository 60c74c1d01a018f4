"""The Ray Serve request router's straggler rule and probe routing, without a cluster: the router
object is built without Ray's base initialisation and given stand-in replicas (only
``replica_id.unique_id`` is read by the parts tested here)."""

from __future__ import annotations

import asyncio
import importlib.util
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (pip install 'tokenmill[ray]')")


def _replica(name: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name))


@pytest.fixture
def router():
    from tokenmill.distributed.ray_serve_fleet import FleetView
    from tokenmill.distributed.ray_serve_router import TokenmillRequestRouter

    FleetView._view = FleetView()  # a fresh process view for each test
    router = object.__new__(TokenmillRequestRouter)
    router.initialize_state(policy="least_loaded", replica_capacity=2)
    router._next_evaluation = float("inf")  # no stats to read here
    yield router
    FleetView._view = FleetView()


def _choose(router, replicas, args=None) -> list[list[str]]:
    pending = SimpleNamespace(args=args or [{"routing_key": ""}])
    ranks = asyncio.run(router.choose_replicas(replicas, pending))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_degraded_replica_is_not_ranked_while_a_healthy_one_has_room(router):
    from tokenmill.distributed.ray_serve_fleet import FleetView

    a, b = _replica("a"), _replica("b")
    router.detector.degraded.add("b")
    assert _choose(router, [a, b]) == [["a"]]
    FleetView.of_this_process().in_flight["a"] = 2  # full (capacity 2): b takes the overflow
    router._reserved.clear()
    assert _choose(router, [a, b]) == [["b"], ["a"]]
    router.detector.degraded.add("a")  # every replica degraded: plain load order
    router._reserved.clear()
    assert _choose(router, [a, b]) == [["b"], ["a"]]
    router.straggler_handling = False
    router.detector.degraded.discard("a")
    router._reserved.clear()
    assert _choose(router, [a, b]) == [["b"], ["a"]]  # handling off: b is simply less loaded


def test_a_probe_goes_to_its_replica_only(router):
    a, b = _replica("a"), _replica("b")
    router.detector.degraded.add("b")
    assert _choose(router, [a, b], [{"probe_replica": "b"}]) == [["b"]]
    assert "b" in router._probe_chosen_at and not router._reserved.get("b")
    # a replica that has gone: the probe is routed like a request (harmless)
    assert _choose(router, [a], [{"probe_replica": "b"}]) == [["a"]]
