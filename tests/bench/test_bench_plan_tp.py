"""Tensor parallelism in the planner: the collectives' cost, where it comes from, old profiles."""

from __future__ import annotations

import dataclasses
import functools
import json

import pytest

from tokenmill.bench.catalog import HARDWARE, find_model
from tokenmill.bench.communication import Interconnect, LinkCost, communication_seconds
from tokenmill.bench.hardware import (
    DecodeProfile,
    HardwareSpec,
    KernelTable,
    OverheadTable,
    load_profile,
    save_profile,
)
from tokenmill.bench.plan import PlanInputs, plan


@functools.cache
def _builtin():
    return find_model(None)  # read from the GGUF file: seconds on a busy machine, so once


def _link(latency_s: float, bytes_per_s: float = 1e9) -> Interconnect:
    cost = LinkCost(latency_s, bytes_per_s)
    return Interconnect(cost, cost, "test link")


def _measured(link: Interconnect | None = None, logical_cpus: int = 64,
              python: OverheadTable | None = None) -> HardwareSpec:
    """A made-up profile: every kernel from one fit, flat overheads, ``link`` between ranks."""
    fit = {"call_s": 5e-6, "bytes_per_s": 20e9, "flops_per_s": 200e9}
    kernels = {k: KernelTable((1, 4, 16), {}, fit, "bf16", 32 if k in ("q4", "q8") else None)
               for k in ("fp32", "bf16", "q4", "q8")}
    overhead = OverheadTable((1, 16), (100,), ((100e-6,), (200e-6,)), (1e-3, 2e-3), 768.0)
    decode = DecodeProfile(kernels, {"bf16/quantized": overhead}, auto_dtype="bf16", threads=1,
                           communication=link,
                           python_overheads={} if python is None else {"bf16/quantized": python})
    return HardwareSpec("this-machine", "this machine: test", 16e9, 10e9,
                        {"fp32": 100e9, "bf16": 400e9}, "synthetic", measured=True,
                        extra={"device": "cpu", "logical_cpus": logical_cpus}, decode=decode)


def _plan(hw: HardwareSpec, tp: int, batch: int = 4):
    return plan(PlanInputs(_builtin(), hw, None, "bf16", tp=tp, batch_size=batch,
                           context_p50=100, context_p95=100))


def test_tp_step_grows_with_the_all_reduce_cost() -> None:
    arch = _builtin()  # 30 layers: 61 all-reduces and one all-gather per step
    cheap, dear = _plan(_measured(_link(10e-6)), 3), _plan(_measured(_link(110e-6)), 3)
    assert cheap.decode_breakdown["communication"] == pytest.approx(
        communication_seconds(arch, _link(10e-6), 4, 3, "bf16"))
    # 100 us more per collective: 62 collectives more per step, everything else the same
    assert dear.decode_step_seconds - cheap.decode_step_seconds == pytest.approx(62 * 100e-6)
    # bytes: an all-reduce of [4, 576] bf16 at TP=3 moves 2 x 2/3 of 4608 bytes per rank
    slow_link = _plan(_measured(_link(10e-6, 1e6)), 3)
    extra = (61 * 2 * 2 / 3 * 4 * 576 * 2 + 2 / 3 * 4 * 49152 * 2) * (1 / 1e6 - 1 / 1e9)
    assert slow_link.decode_step_seconds - cheap.decode_step_seconds == pytest.approx(extra)
    # TP=1 has no collectives, whatever the link
    assert "communication" not in _plan(_measured(_link(110e-6)), 1).decode_breakdown


def test_tp_uses_python_layer_overheads_and_counts_oversubscribed_cores() -> None:
    python = OverheadTable((1, 16), (100,), ((300e-6,), (400e-6,)), (1e-3, 2e-3), 768.0)
    hw = _measured(_link(0.0, 1e30), python=python)
    assert _plan(hw, 1, batch=1).decode_breakdown["layers"] == pytest.approx(30 * 100e-6)
    tp3 = _plan(hw, 3, batch=1).decode_breakdown
    assert tp3["layers"] == pytest.approx(30 * 300e-6)  # the native decode stack steps aside
    assert "oversubscribed" not in tp3
    # 3 ranks x 1 thread on 2 CPUs: the compute takes 3/2 as long
    crowded = _plan(dataclasses.replace(hw, extra={"device": "cpu", "logical_cpus": 2}), 3, 1)
    parts = crowded.decode_breakdown
    assert parts["oversubscribed"] == pytest.approx(
        0.5 * (parts["linears"] + parts["layers"] + parts["step"]))


def test_catalog_devices_add_their_interconnect() -> None:
    arch = find_model("Llama-3-70B")
    h100 = HARDWARE["h100-80gb"]
    assert h100.communication is not None and "NVLink" in h100.communication.source
    with_link = plan(PlanInputs(arch, h100, "bf16", tp=4, batch_size=8))
    without = plan(PlanInputs(arch, dataclasses.replace(h100, interconnect=None), "bf16", tp=4,
                              batch_size=8))
    assert with_link.communication_seconds > 0 and without.communication_seconds == 0
    assert with_link.decode_step_seconds == pytest.approx(
        without.decode_step_seconds + with_link.communication_seconds)
    # PCIe is slower than NVLink for the same collectives
    l4 = plan(PlanInputs(find_model("Llama-3-8B"), HARDWARE["l4"], "bf16", tp=2, batch_size=8))
    h100_8b = plan(PlanInputs(find_model("Llama-3-8B"), h100, "bf16", tp=2, batch_size=8))
    assert l4.communication_seconds > h100_8b.communication_seconds


def test_profile_round_trip_and_an_old_profile_without_tp_figures(tmp_path) -> None:
    python = OverheadTable((1, 16), (100,), ((300e-6,), (400e-6,)), (1e-3, 2e-3), 768.0)
    link = Interconnect(LinkCost(20e-6, 2e9), LinkCost(50e-6, 1e9), "measured", 2, "bf16",
                        {"all_reduce": [[1152.0, 2e-5]], "all_gather": [[49152.0, 7e-5]]})
    hw = _measured(link, python=python)
    path = tmp_path / "hardware.json"
    save_profile(hw, path)
    assert load_profile(path).decode == hw.decode
    # a profile saved before TP figures existed: no "communication", no "python_overheads"
    old = json.loads(path.read_text())
    del old["decode"]["communication"], old["decode"]["python_overheads"], old["interconnect"]
    path.write_text(json.dumps(old))
    loaded = load_profile(path)
    assert loaded.decode.communication is None and loaded.decode.python_overheads == {}
    assert loaded.communication is None
    parts = _plan(loaded, 3).decode_breakdown
    assert "communication" not in parts and parts["layers"] > 0  # planned, without the term


def test_profile_measures_the_engine_all_reduce_between_two_ranks() -> None:
    from tokenmill.bench.collective_profile import measure_collectives

    link = measure_collectives(64, 256, "fp32", rows=(1, 8), iterations=5, repeats=1)
    assert link.world_size == 2 and len(link.samples["all_reduce"]) == 2
    assert all(seconds > 0 and nbytes > 0 for nbytes, seconds in link.samples["all_reduce"])
    assert all(seconds > 0 for _, seconds in link.samples["all_gather"])
    for cost in (link.all_reduce, link.all_gather):
        assert cost.latency_s >= 0 and cost.bytes_per_s > 0
        assert cost.seconds(1024) > 0
