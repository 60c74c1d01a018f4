"""The replica-choice policies shared by the gateway and the Ray Serve router, and the straggler
detector, without any server: items are (name, load) pairs."""

from __future__ import annotations

import logging

from tokenmill.routing_policy import (
    StragglerDetector,
    StragglerPolicy,
    affinity_owner,
    batch_bucket,
    order_by_load,
    prefix_affinity_order,
)

NAMES = ["r0", "r1", "r2"]


def _order(loads: dict[str, float], key: str, turn: int = 0, cap: float = 4):
    return prefix_affinity_order(NAMES, str, loads.__getitem__, key, turn, cap)


def test_least_loaded_first_and_ties_rotate():
    loads = {"r0": 2, "r1": 0, "r2": 1}
    assert order_by_load(NAMES, loads.__getitem__, 0) == ["r1", "r2", "r0"]
    idle = dict.fromkeys(NAMES, 0)
    firsts = {order_by_load(NAMES, idle.__getitem__, turn)[0] for turn in range(3)}
    assert firsts == set(NAMES)  # idle replicas share the work


def test_prefix_affinity_keeps_a_key_on_its_owner_until_the_load_cap():
    idle = dict.fromkeys(NAMES, 0)
    key = "You are a helpful assistant. " * 4
    owner = affinity_owner(NAMES, str, key)
    for turn in range(5):
        ordered, capped = _order(idle, key, turn)
        assert ordered[0] == owner and not capped
    busy = {**idle, owner: 4}  # 4 more in flight than the least loaded: the cap
    ordered, capped = _order(busy, key)
    assert capped and ordered[0] != owner and ordered[-1] == owner
    ordered, capped = _order({**idle, owner: 3}, key)
    assert ordered[0] == owner and not capped


def test_different_keys_spread_over_replicas():
    owners = {affinity_owner(NAMES, str, f"document {i}: ...") for i in range(30)}
    assert owners == set(NAMES)


def test_the_owner_of_a_key_moves_only_when_its_replica_leaves():
    keys = [f"prompt {i}" for i in range(60)]
    before = {k: affinity_owner(NAMES, str, k) for k in keys}
    after = {k: affinity_owner(["r0", "r1"], str, k) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r2")


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 300)] == [1, 2, 4, 4, 8, 8, 16, 512]


def _times(slow: float, fast: float = 0.01, n: int = 10):
    return {"a": {4: (fast, n), 8: (2 * fast, n)}, "b": {4: (fast * 1.05, n), 8: (2 * fast, n)},
            "c": {4: (fast * slow, n), 8: (2 * fast * slow, n)}}


def test_a_replica_persistently_slower_than_the_median_is_marked_then_cleared(caplog):
    changes = []
    detector = StragglerDetector(StragglerPolicy(factor=1.3, persistence=3),
                                 on_change=lambda *change: changes.append(change))
    with caplog.at_level(logging.WARNING, logger="tokenmill.routing_policy"):
        for _ in range(2):
            detector.update(_times(slow=2.0))
        assert detector.degraded == set()  # not yet persistent
        detector.update(_times(slow=2.0))
    assert detector.degraded == {"c"}
    assert abs(detector.slowdown["c"] - 2.0) < 0.1
    assert changes == [("c", True, detector.slowdown["c"])]
    assert "replica c is degraded" in caplog.text
    assert detector.effective_load("c", 0) > detector.effective_load("a", 2) - 2  # ranks behind
    assert detector.effective_load("c", 1) > detector.effective_load("a", 1)
    for _ in range(3):
        detector.update(_times(slow=1.0))
    assert detector.degraded == set() and changes[-1][:2] == ("c", False)


def test_a_brief_slowdown_or_too_few_steps_marks_nothing():
    detector = StragglerDetector(StragglerPolicy(factor=1.3, persistence=3, min_steps=5))
    for slow in (2.0, 2.0, 1.0, 2.0, 2.0, 1.0):
        detector.update(_times(slow=slow))
    assert detector.degraded == set()
    for _ in range(5):
        detector.update(_times(slow=3.0, n=2))  # 2 steps per bucket: not enough to judge
    assert detector.degraded == set()


def test_two_replicas_compare_with_each_other():
    detector = StragglerDetector(StragglerPolicy(factor=1.3, persistence=1))
    detector.update({"a": {1: (0.02, 9)}, "b": {1: (0.04, 9)}})
    assert detector.degraded == {"b"}
    detector.update({"a": {1: (0.02, 9)}})  # b left: forgotten
    assert detector.degraded == set()
