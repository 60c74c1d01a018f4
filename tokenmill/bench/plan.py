"""Capacity planning: does a model fit a device, how many requests, how fast, at what cost.

Everything here is arithmetic on ``ModelArch`` and ``HardwareSpec``:

* memory: weights as tokenmill holds them in the chosen format (``ModelArch.weight_layout``), split
  evenly over the tensor-parallel (TP) ranks; KV heads are split too, but a rank holds at least
  one (ranks beyond the KV-head count replicate, as vLLM does);
* decode, on a device with a measured ``DecodeProfile`` (``tokenmill profile``): the sum over the
  model's linears of the measured time of that layer's kernel at that (M, K, N) and format, plus
  the measured per-layer overhead (norms, rotary, attention at the context, residuals) times the
  layers, plus the measured fixed per-step overhead (inputs, sampling, scheduling), plus what
  serving it was measured to add per step (``tokenmill serve`` against the engine alone);
* decode elsewhere (catalog devices): a roofline, bytes read per step ÷ bandwidth or FLOPs ÷ peak
  (on a CPU, whose cores both move the bytes and do the math, the two times add up instead);
* prefill of one prompt is compute bound (FLOPs ÷ peak), never faster than reading the weights once;
* TP > 1 adds the collectives of a step, ``2 x layers + 1`` all-reduces of the activations and an
  all-gather of the logits, each latency + bytes ÷ bandwidth (``communication.py``: measured here
  by ``tokenmill profile``, datasheet links for catalog devices); on a measured machine the
  per-layer overhead is the one measured with the native decode stack off (TP runs the Python
  layers), and ranks that need more threads than the machine has cores stretch the compute.

Roofline estimates are ceilings: no kernel reaches the datasheet peak. Communication is added
after the compute (a decode step's all-reduce waits for the matmul before it); ranks waiting for
the slowest one are not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tokenmill.bench.architecture import BYTES_PER_PARAM, DENSE_DTYPES, ModelArch
from tokenmill.bench.communication import communication_seconds
from tokenmill.bench.hardware import DecodeProfile, HardwareSpec
from tokenmill.errors import BenchError

TP_CANDIDATES = (1, 2, 4, 8, 16, 32)
QUANT_ORDER = ("fp32", "bf16", "fp8", "int8", "int4")  # most to fewest bytes per weight
MAX_DEFAULT_BATCH = 256


@dataclass(frozen=True)
class PlanInputs:
    arch: ModelArch
    hardware: HardwareSpec
    weight_dtype: str | None = "bf16"  # None = as stored in the model file
    kv_dtype: str = "bf16"
    tp: int = 1
    context_p50: int = 2048
    context_p95: int = 8192
    batch_size: int | None = None  # None = as many as fit at p50 context ("full load")
    prompt_len: int = 1024
    price_per_hour: float | None = None  # per device; None = the catalog's example price
    memory_utilization: float = 0.9
    compute_dtype: str | None = None  # activations; None = the weights' dtype, or what
    # ``--dtype auto`` picks on the device for quantized / as-stored weights
    group_size: int = 32  # int4: inputs per scale and min
    serving: bool = True  # measured profile: include serving's cost (False: the engine alone)

    @property
    def resolved_compute_dtype(self) -> str:
        if self.compute_dtype:
            return self.compute_dtype
        if self.weight_dtype in DENSE_DTYPES:
            return self.weight_dtype
        decode = self.hardware.decode
        return decode.auto_dtype if decode is not None else "bf16"

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise BenchError(f"--tp={self.tp} must be at least 1")
        if self.arch.num_heads % self.tp:
            raise BenchError(f"--tp={self.tp} does not divide the {self.arch.num_heads} attention "
                             f"heads of {self.arch.name}")
        if not 0 < self.context_p50 <= self.context_p95:
            raise BenchError(f"context p50={self.context_p50} and p95={self.context_p95} must "
                             "satisfy 0 < p50 <= p95")
        if self.batch_size is not None and self.batch_size < 1:
            raise BenchError(f"--batch={self.batch_size} must be at least 1")
        if self.prompt_len < 1:
            raise BenchError(f"--prompt-len={self.prompt_len} must be at least 1")
        if self.price_per_hour is not None and not self.price_per_hour >= 0:
            raise BenchError(f"--price-per-hour={self.price_per_hour} must be >= 0")
        if not 0 < self.memory_utilization <= 1:
            raise BenchError(f"--memory-utilization={self.memory_utilization} must be in (0, 1]")


@dataclass(frozen=True)
class PlanResult:
    inputs: PlanInputs
    weight_bytes: float
    weight_bytes_per_device: float
    kv_bytes_per_token: float
    kv_bytes_per_token_per_device: float
    usable_bytes_per_device: float
    kv_capacity_tokens: int
    fits: bool
    shortfall_bytes_per_device: float
    concurrent_at_p50: int
    concurrent_at_p95: int
    batch_size: int
    batch_fits: bool
    decode_step_seconds: float
    decode_bound: str  # "memory" or "compute" (roofline), "measured" (a decode profile)
    decode_tokens_per_s_per_stream: float
    decode_tokens_per_s: float
    ttft_seconds: float
    compute_dtype: str
    price_per_hour_total: float | None
    price_is_example: bool
    dollars_per_million_output_tokens: float | None
    smallest_fitting_tp: int | None
    smallest_fitting_weight_dtype: str | None
    weights_description: str = ""
    # measured model: seconds per step in linears, per-layer overhead (all layers), per-step
    decode_breakdown: dict[str, float] | None = None
    communication_seconds: float = 0.0  # TP collectives per decode step (part of the step)


def _kv_heads_per_device(arch: ModelArch, tp: int) -> int:
    return max(1, math.ceil(arch.num_kv_heads / tp))


def _kv_bytes_per_token_per_device(arch: ModelArch, kv_dtype: str, tp: int) -> float:
    return (2 * arch.num_layers * _kv_heads_per_device(arch, tp) * arch.head_dim
            * BYTES_PER_PARAM[kv_dtype])


def _memory_fit(inp: PlanInputs) -> tuple[float, float, int, float]:
    """(weights per device, KV bytes/token per device, KV capacity in tokens, shortfall bytes)."""
    weights_per_device = _weight_bytes(inp) / inp.tp
    kv_per_token = _kv_bytes_per_token_per_device(inp.arch, inp.kv_dtype, inp.tp)
    usable = inp.hardware.memory_bytes * inp.memory_utilization
    budget = usable - weights_per_device
    capacity = max(0, int(budget // kv_per_token))
    shortfall = max(0.0, weights_per_device + inp.context_p95 * kv_per_token - usable)
    return weights_per_device, kv_per_token, capacity, shortfall


def _weight_bytes(inp: PlanInputs) -> float:
    return inp.arch.weight_bytes(inp.weight_dtype, inp.group_size, inp.resolved_compute_dtype)


def uses_measured_decode(hw: HardwareSpec) -> bool:
    decode = hw.decode
    return decode is not None and bool(decode.kernels) and bool(decode.overheads)


def measured_decode_breakdown(inp: PlanInputs, batch_size: int,
                              context_len: int) -> dict[str, float]:
    """Seconds of one decode step from a measured ``DecodeProfile``, by part:

    ``linears`` = Σ over the model's linears (on one TP rank: output columns ÷ TP) of the measured
    kernel time at M = batch (for MoE experts: the tokens each touched expert gets), with q4/q8
    weights at another group size than measured corrected by their extra bytes at the fitted
    bandwidth; ``layers`` = layers × measured per-layer overhead at (batch, context), its
    context-dependent part scaled by this model's KV bytes per token per layer over the measured
    model's; ``step`` = the measured fixed per-step overhead at the batch; ``serving`` = what
    ``tokenmill serve`` was measured to add per step at the batch, unless ``inp.serving`` is
    off."""
    arch = inp.arch
    decode: DecodeProfile = inp.hardware.decode
    compute = inp.resolved_compute_dtype
    layout = arch.weight_layout(inp.weight_dtype, compute, inp.group_size)
    linears = 0.0
    for layer in layout.linears:
        table, used = decode.kernel(layer.fmt.kernel, compute)
        if table is None:
            raise BenchError("the hardware profile has no kernel times; run `tokenmill profile`")
        rows, count = float(batch_size), float(layer.count)
        if layer.expert:
            touched = arch.experts_touched(batch_size)
            rows = batch_size * arch.num_experts_per_token / touched
            count = layer.count / arch.num_experts * touched
        in_features, out_features = _rank_shape(layer.role, layer.in_features,
                                                layer.out_features, inp.tp)
        nbytes = layer.fmt.nbytes(in_features, out_features)
        seconds = table.seconds(rows, in_features, out_features, nbytes)
        if used in ("q4", "q8") and table.group_size and layer.fmt.group_size != table.group_size:
            from tokenmill.bench.architecture import WeightFormat

            measured_fmt = WeightFormat(used, used, table.group_size)
            extra = nbytes - measured_fmt.nbytes(in_features, out_features)
            seconds = max(table.fit["call_s"], seconds + extra / table.fit["bytes_per_s"])
        linears += count * seconds
    quantized = any(layer.fmt.kernel in ("q4", "q8", "fp8") for layer in layout.linears
                    if layer.role != "lm_head")
    overhead = decode.overhead(compute, quantized, python_layers=inp.tp > 1)
    kv_layer = (2 * _kv_heads_per_device(arch, inp.tp) * arch.head_dim
                * BYTES_PER_PARAM[inp.kv_dtype])
    kv_scale = kv_layer / overhead.kv_bytes_per_token_per_layer
    layers = arch.num_layers * overhead.layer_seconds(batch_size, context_len, kv_scale)
    parts = {"linears": linears, "layers": layers, "step": overhead.step_seconds(batch_size)}
    stretch = _oversubscription(inp)
    if stretch > 1:
        parts["oversubscribed"] = (stretch - 1) * sum(parts.values())
    link = inp.hardware.communication
    if inp.tp > 1 and link is not None:
        parts["communication"] = communication_seconds(arch, link, batch_size, inp.tp, compute)
    if decode.serving is not None and inp.serving:
        parts["serving"] = decode.serving.seconds(batch_size)
    return parts


def _rank_shape(role: str, in_features: int, out_features: int, tp: int) -> tuple[int, int]:
    """One rank's share of a linear: row-parallel layers (attention output, MLP down) split
    their inputs, the others (qkv, gate/up, the vocab-parallel head) their outputs; a router is
    replicated."""
    if tp == 1 or role == "router":
        return in_features, out_features
    if role in ("o", "down"):
        return max(1, math.ceil(in_features / tp)), out_features
    return in_features, max(1, math.ceil(out_features / tp))


def _oversubscription(inp: PlanInputs) -> float:
    """How much longer the ranks' compute takes when they need more threads than the measured
    machine has logical CPUs (they take turns on the cores): TP ranks x threads per rank, which
    ``tokenmill serve`` sets to its thread count (the profile's) ÷ TP, at least 1."""
    decode, cpus = inp.hardware.decode, inp.hardware.extra.get("logical_cpus")
    if inp.tp == 1 or decode is None or not cpus:
        return 1.0
    return max(1.0, inp.tp * max(1, decode.threads // inp.tp) / float(cpus))


def decode_step(inp: PlanInputs, batch_size: int, context_len: int) -> tuple[float, str]:
    """Seconds for one decode step of ``batch_size`` sequences at ``context_len``, and the bound
    ("measured" when the device has a decode profile, else the roofline's "memory"/"compute")."""
    arch, hw = inp.arch, inp.hardware
    if uses_measured_decode(hw):
        return sum(measured_decode_breakdown(inp, batch_size, context_len).values()), "measured"
    kv_per_token = _kv_bytes_per_token_per_device(arch, inp.kv_dtype, inp.tp)
    weight_read = arch.decode_weight_bytes_read(inp.weight_dtype, batch_size, inp.group_size,
                                                inp.resolved_compute_dtype)
    bytes_read = weight_read / inp.tp + batch_size * context_len * kv_per_token
    flops = batch_size * (2.0 * arch.num_active_params
                          + arch.attention_flops_per_token(context_len)) / inp.tp
    peak, _ = hw.flops_for(inp.weight_dtype)
    memory_time = bytes_read / hw.bandwidth_bytes_per_s
    compute_time = flops / peak
    bound = "memory" if memory_time >= compute_time else "compute"
    link = hw.communication
    communication = (0.0 if link is None else
                     communication_seconds(arch, link, batch_size, inp.tp,
                                           inp.resolved_compute_dtype))
    if hw.overlaps_memory_and_compute:
        return max(memory_time, compute_time) + communication, bound
    return memory_time + compute_time + communication, bound


def prefill_seconds(inp: PlanInputs, prompt_len: int) -> float:
    """Time to prefill one prompt alone: causal attention sums to about P²/2 positions."""
    arch, hw = inp.arch, inp.hardware
    flops = (2.0 * arch.num_active_params * prompt_len
             + arch.attention_flops_per_token(1) * prompt_len * prompt_len / 2) / inp.tp
    peak, _ = hw.flops_for(inp.weight_dtype)
    read_weights = _weight_bytes(inp) / inp.tp / hw.bandwidth_bytes_per_s
    return max(flops / peak, read_weights)


def _fits(inp: PlanInputs) -> bool:
    return _memory_fit(inp)[3] == 0.0


def smallest_fitting_tp(inp: PlanInputs) -> int | None:
    for tp in TP_CANDIDATES:
        if tp >= inp.tp and inp.arch.num_heads % tp == 0 and _fits(replace(inp, tp=tp)):
            return tp
    return None


def smallest_fitting_weight_dtype(inp: PlanInputs) -> str | None:
    """The widest weight dtype (least quality loss) that fits at the requested TP degree."""
    current = _weight_bytes(inp)
    for dtype in QUANT_ORDER:
        candidate = replace(inp, weight_dtype=dtype)
        if _weight_bytes(candidate) <= current and _fits(candidate):
            return dtype
    return None


def plan(inp: PlanInputs) -> PlanResult:
    arch, hw = inp.arch, inp.hardware
    weights_per_device, kv_per_token_dev, capacity, shortfall = _memory_fit(inp)
    fits = shortfall == 0.0
    concurrent_p50 = capacity // inp.context_p50
    concurrent_p95 = capacity // inp.context_p95
    batch = inp.batch_size or max(1, min(concurrent_p50, MAX_DEFAULT_BATCH))
    step, bound = decode_step(inp, batch, inp.context_p50)
    breakdown = (measured_decode_breakdown(inp, batch, inp.context_p50) if bound == "measured"
                 else None)
    _, compute_dtype = hw.flops_for(inp.weight_dtype)
    link = hw.communication
    communication = (0.0 if link is None else
                     communication_seconds(arch, link, batch, inp.tp, inp.resolved_compute_dtype))

    price_is_example = inp.price_per_hour is None
    per_device = hw.example_price_per_hour if price_is_example else inp.price_per_hour
    price_total = None if per_device is None else per_device * inp.tp
    aggregate = batch / step
    cost = None
    if price_total is not None and fits:
        cost = price_total / (aggregate * 3600.0) * 1e6
    return PlanResult(
        inputs=inp,
        weight_bytes=_weight_bytes(inp),
        weight_bytes_per_device=weights_per_device,
        kv_bytes_per_token=arch.kv_bytes_per_token(inp.kv_dtype),
        kv_bytes_per_token_per_device=kv_per_token_dev,
        usable_bytes_per_device=hw.memory_bytes * inp.memory_utilization,
        kv_capacity_tokens=capacity,
        fits=fits,
        shortfall_bytes_per_device=shortfall,
        concurrent_at_p50=concurrent_p50,
        concurrent_at_p95=concurrent_p95,
        batch_size=batch,
        batch_fits=fits and batch <= concurrent_p50,
        decode_step_seconds=step,
        decode_bound=bound,
        decode_tokens_per_s_per_stream=1.0 / step,
        decode_tokens_per_s=aggregate,
        ttft_seconds=prefill_seconds(inp, inp.prompt_len),
        compute_dtype=compute_dtype,
        price_per_hour_total=price_total,
        price_is_example=price_is_example and price_total is not None,
        dollars_per_million_output_tokens=cost,
        smallest_fitting_tp=None if fits else smallest_fitting_tp(inp),
        smallest_fitting_weight_dtype=None if fits else smallest_fitting_weight_dtype(inp),
        weights_description=arch.weight_layout(inp.weight_dtype, inp.resolved_compute_dtype,
                                               inp.group_size).description,
        decode_breakdown=breakdown,
        communication_seconds=communication,
    )
