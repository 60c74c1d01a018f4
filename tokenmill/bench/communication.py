"""What tensor parallelism adds to a decode step: the collectives between the ranks.

A decode step of a model split over TP ranks (Megatron-style, as tokenmill runs it) sums partial
results twice per decoder layer (after the attention's output projection and after the MLP's down
projection, both row-parallel) and once for the vocab-parallel embedding: ``2 x layers + 1``
all-reduces of the ``[batch, hidden]`` activations in the compute dtype. The vocab-parallel LM
head's logits are then gathered: one all-gather whose result is ``[batch, vocab]``.

Each collective costs ``latency + bus bytes / bus bandwidth`` (``LinkCost``), with bus bytes as
nccl-tests counts them, so that one bandwidth figure holds for any number of ranks: a ring
all-reduce of S bytes moves ``2 (TP-1)/TP x S`` through each rank's link, an all-gather whose result
is S bytes ``(TP-1)/TP x S``. At TP=2 the bus bytes of an all-reduce are the message's bytes.

Where the figures come from (``Interconnect.source`` says which):

* this machine: ``tokenmill profile`` times the engine's own all-reduce and all-gather between 2
  spawned ranks on loopback (``tokenmill.bench.collective_profile``) and fits the two terms;
* catalog devices: the datasheet's link bandwidth (NVLink or PCIe, one direction) and an assumed
  per-collective latency (datasheets give none; small-message NCCL all-reduces take ~10 µs).

What this does not see: ranks that wait for the slowest one (a rank that computes longer makes
the others' all-reduce longer), and latency growing with the number of ranks (it is taken as
measured at 2 ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.bench.architecture import BYTES_PER_PARAM, ModelArch

_NO_TERM = 1e30  # a fitted bandwidth whose term dropped out (JSON has no infinity)


@dataclass(frozen=True)
class LinkCost:
    """Seconds of one collective: ``latency_s + bus_bytes / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def seconds(self, bus_bytes: float) -> float:
        return self.latency_s + bus_bytes / self.bytes_per_s


@dataclass(frozen=True)
class Interconnect:
    """How fast the ranks of a TP group exchange activations."""

    all_reduce: LinkCost
    all_gather: LinkCost
    source: str
    # measured (``tokenmill profile``): what was timed, for the record
    world_size: int = 2
    dtype: str = ""
    samples: dict[str, list[list[float]]] | None = None  # collective -> [[bytes, seconds], ...]


def all_reduce_bus_bytes(nbytes: float, tp: int) -> float:
    return 2.0 * (tp - 1) / tp * nbytes


def all_gather_bus_bytes(result_bytes: float, tp: int) -> float:
    return (tp - 1) / tp * result_bytes


def num_all_reduces(arch: ModelArch) -> int:
    """Per decode step: two per decoder layer (attention output, MLP down; an MoE block's
    tensor-sliced experts also end in one) and one for the vocab-parallel embedding."""
    return 2 * arch.num_layers + 1


def communication_seconds(arch: ModelArch, link: Interconnect, batch: float, tp: int,
                          compute_dtype: str) -> float:
    """Seconds per decode step of ``batch`` sequences spent in TP collectives (0 at TP=1)."""
    if tp <= 1:
        return 0.0
    act_bytes = BYTES_PER_PARAM.get(compute_dtype, 4)
    hidden = batch * arch.hidden_size * act_bytes
    logits = batch * arch.vocab_size * act_bytes  # gathered before the cast to float32
    return (num_all_reduces(arch) * link.all_reduce.seconds(all_reduce_bus_bytes(hidden, tp))
            + link.all_gather.seconds(all_gather_bus_bytes(logits, tp)))


def fit_link(samples: list[tuple[float, float]]) -> LinkCost:
    """Least squares of ``seconds = latency + bus_bytes / bandwidth`` over (bus bytes, seconds),
    both terms kept non-negative (a flat or falling curve is all latency)."""
    import numpy as np

    x = np.array([s[0] for s in samples], dtype=float)
    y = np.array([s[1] for s in samples], dtype=float)
    if len(samples) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        if slope > 0 and intercept >= 0:
            return LinkCost(float(intercept), float(1.0 / slope))
        if slope > 0:  # through the origin
            return LinkCost(0.0, float((x * x).sum() / (x * y).sum()))
    return LinkCost(float(y.mean()), _NO_TERM)


def interconnect_from_json(data: dict | None) -> Interconnect | None:
    if not data:
        return None

    def link(d: dict) -> LinkCost:
        return LinkCost(float(d["latency_s"]), float(d["bytes_per_s"]))

    samples = data.get("samples")
    return Interconnect(
        link(data["all_reduce"]), link(data["all_gather"]), str(data.get("source", "")),
        int(data.get("world_size", 2)), str(data.get("dtype", "")),
        {str(k): [[float(a), float(b)] for a, b in v] for k, v in samples.items()}
        if samples else None)
