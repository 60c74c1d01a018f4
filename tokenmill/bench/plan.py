"""Capacity planning: does a model fit a device, how many requests, how fast, at what cost.

Everything here is closed-form arithmetic on ``ModelArch`` and ``HardwareSpec`` (a roofline model):

* memory: weights are split evenly over the tensor-parallel (TP) ranks; KV heads are split too,
  but a rank holds at least one (ranks beyond the KV-head count replicate, as vLLM does);
* decode is bound by bytes read per step ÷ bandwidth, or by FLOPs ÷ peak when the batch is large
  (on a CPU, whose cores both move the bytes and do the math, the two times add up instead);
* prefill of one prompt is compute bound (FLOPs ÷ peak), never faster than reading the weights once.

The estimates are ceilings: no kernel reaches the datasheet peak, TP communication is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tokenmill.bench.architecture import BYTES_PER_PARAM, ModelArch
from tokenmill.bench.hardware import HardwareSpec
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
    decode_bound: str  # "memory" or "compute"
    decode_tokens_per_s_per_stream: float
    decode_tokens_per_s: float
    ttft_seconds: float
    compute_dtype: str
    price_per_hour_total: float | None
    price_is_example: bool
    dollars_per_million_output_tokens: float | None
    smallest_fitting_tp: int | None
    smallest_fitting_weight_dtype: str | None


def _kv_heads_per_device(arch: ModelArch, tp: int) -> int:
    return max(1, math.ceil(arch.num_kv_heads / tp))


def _kv_bytes_per_token_per_device(arch: ModelArch, kv_dtype: str, tp: int) -> float:
    return (2 * arch.num_layers * _kv_heads_per_device(arch, tp) * arch.head_dim
            * BYTES_PER_PARAM[kv_dtype])


def _memory_fit(inp: PlanInputs) -> tuple[float, float, int, float]:
    """(weights per device, KV bytes/token per device, KV capacity in tokens, shortfall bytes)."""
    weights_per_device = inp.arch.weight_bytes(inp.weight_dtype) / inp.tp
    kv_per_token = _kv_bytes_per_token_per_device(inp.arch, inp.kv_dtype, inp.tp)
    usable = inp.hardware.memory_bytes * inp.memory_utilization
    budget = usable - weights_per_device
    capacity = max(0, int(budget // kv_per_token))
    shortfall = max(0.0, weights_per_device + inp.context_p95 * kv_per_token - usable)
    return weights_per_device, kv_per_token, capacity, shortfall


def decode_step(inp: PlanInputs, batch_size: int, context_len: int) -> tuple[float, str]:
    """Seconds for one decode step of ``batch_size`` sequences at ``context_len``, and the bound."""
    arch, hw = inp.arch, inp.hardware
    kv_per_token = _kv_bytes_per_token_per_device(arch, inp.kv_dtype, inp.tp)
    bytes_read = (arch.decode_weight_bytes_read(inp.weight_dtype, batch_size) / inp.tp
                  + batch_size * context_len * kv_per_token)
    flops = batch_size * (2.0 * arch.num_active_params
                          + arch.attention_flops_per_token(context_len)) / inp.tp
    peak, _ = hw.flops_for(inp.weight_dtype)
    memory_time = bytes_read / hw.bandwidth_bytes_per_s
    compute_time = flops / peak
    bound = "memory" if memory_time >= compute_time else "compute"
    if hw.overlaps_memory_and_compute:
        return max(memory_time, compute_time), bound
    return memory_time + compute_time, bound


def prefill_seconds(inp: PlanInputs, prompt_len: int) -> float:
    """Time to prefill one prompt alone: causal attention sums to about P²/2 positions."""
    arch, hw = inp.arch, inp.hardware
    flops = (2.0 * arch.num_active_params * prompt_len
             + arch.attention_flops_per_token(1) * prompt_len * prompt_len / 2) / inp.tp
    peak, _ = hw.flops_for(inp.weight_dtype)
    read_weights = arch.weight_bytes(inp.weight_dtype) / inp.tp / hw.bandwidth_bytes_per_s
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
    current = (inp.arch.bytes_per_param(inp.weight_dtype) if inp.weight_dtype is None
               else BYTES_PER_PARAM[inp.weight_dtype])
    for dtype in QUANT_ORDER:
        if BYTES_PER_PARAM[dtype] <= current and _fits(replace(inp, weight_dtype=dtype)):
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
    _, compute_dtype = hw.flops_for(inp.weight_dtype)

    price_is_example = inp.price_per_hour is None
    per_device = hw.example_price_per_hour if price_is_example else inp.price_per_hour
    price_total = None if per_device is None else per_device * inp.tp
    aggregate = batch / step
    cost = None
    if price_total is not None and fits:
        cost = price_total / (aggregate * 3600.0) * 1e6
    return PlanResult(
        inputs=inp,
        weight_bytes=arch.weight_bytes(inp.weight_dtype),
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
    )
