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
    straggler_order,
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


def _straggler_order(loads: dict[str, float], degraded: set[str], capacity: float = 4):
    """The rule applied to NAMES in the policy's order r0, r1, r2."""
    return straggler_order(NAMES, degraded.__contains__, loads.__getitem__, capacity)


def test_a_degraded_replica_gets_nothing_while_a_healthy_one_has_room():
    for loads in ({"r0": 0, "r1": 0, "r2": 0}, {"r0": 3, "r1": 0, "r2": 9}, {"r0": 3, "r1": 0,
                                                                           "r2": 4}):
        ordered, overflow = _straggler_order(loads, {"r1"})
        # behind every healthy one (failover only), even idle and first in the policy's order
        assert ordered == ["r0", "r2", "r1"] and not overflow
    ordered, _ = _straggler_order({"r0": 4, "r1": 0, "r2": 0}, {"r0", "r1"})
    assert ordered == ["r2", "r0", "r1"]


def test_overflow_goes_to_a_degraded_replica_only_when_every_healthy_one_is_full():
    ordered, overflow = _straggler_order({"r0": 4, "r1": 0, "r2": 5}, {"r1"})
    assert ordered == ["r1", "r0", "r2"] and overflow
    # two degraded with room: the less loaded first
    ordered, overflow = _straggler_order({"r0": 2, "r1": 1, "r2": 4}, {"r0", "r1"})
    assert ordered == ["r1", "r0", "r2"] and overflow
    # everyone full: no degraded replica is the better place, the healthy order stands
    ordered, overflow = _straggler_order({"r0": 4, "r1": 6, "r2": 5}, {"r1"})
    assert ordered == ["r0", "r2", "r1"] and not overflow


def test_with_every_replica_degraded_or_none_the_policy_order_stands():
    loads = {"r0": 9, "r1": 0, "r2": 2}
    assert _straggler_order(loads, set(NAMES)) == (NAMES, False)
    assert _straggler_order(loads, set()) == (NAMES, False)


def test_probed_replica_recovers_against_the_others_remembered_single_request_steps(caplog):
    """A degraded replica that gets only probes runs single-request steps (bucket 1) while the
    healthy ones, busy, run larger batches: it is compared with their last bucket-1 figures."""
    detector = StragglerDetector(StragglerPolicy(factor=1.3, persistence=2))
    for _ in range(2):  # all three serve traffic; c is slow
        detector.update(_times(slow=2.0) | {"a": {1: (0.005, 9), 4: (0.01, 9)},
                                            "c": {1: (0.010, 9), 4: (0.02, 9)}})
    assert detector.degraded == {"c"}
    busy = {"a": {8: (0.02, 30)}, "b": {8: (0.021, 30)}}  # no single-request steps lately
    for _ in range(3):  # probes on c, still slow: stays degraded
        detector.update(busy | {"c": {1: (0.011, 7)}})
    assert detector.degraded == {"c"}
    with caplog.at_level(logging.WARNING, logger="tokenmill.routing_policy"):
        for _ in range(2):  # back to speed: cleared after ``persistence`` evaluations
            detector.update(busy | {"c": {1: (0.005, 7)}})
    assert detector.degraded == set()
    assert "replica c recovered" in caplog.text


def test_a_remembered_figure_never_marks_a_healthy_replica():
    detector = StragglerDetector(StragglerPolicy(factor=1.3, persistence=1))
    detector.update({"a": {1: (0.01, 9)}, "b": {1: (0.01, 9)}})
    for _ in range(3):  # b's single-request steps, 3x a's from a quieter moment: no fresh peer
        detector.update({"a": {8: (0.02, 9)}, "b": {1: (0.03, 9)}})
    assert detector.degraded == set()


def test_only_evaluations_with_new_steps_count_towards_persistence():
    """An idle replica's window is read again every evaluation; one noisy window must not mark
    it by being read ``persistence`` times."""
    detector = StragglerDetector(StragglerPolicy(factor=1.3, persistence=3))
    for _ in range(5):  # c ran nothing since its slow-looking window: judged once
        detector.update(_times(slow=2.0), {"a": 100, "b": 100, "c": 40})
    assert detector.degraded == set()
    for steps in (41, 42):  # with fresh steps, the next two evaluations count too
        detector.update(_times(slow=2.0), {"a": 100, "b": 100, "c": steps})
    assert detector.degraded == {"c"}
    for steps in (43, 44, 45):  # a restarted engine's count may go down: a change is a change
        detector.update(_times(slow=1.0), {"a": 100, "b": 100, "c": 3 if steps == 44 else steps})
    assert detector.degraded == set()
