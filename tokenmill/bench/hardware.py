"""A device the planner can put a model on: memory, bandwidth and peak FLOP/s per dtype.

Catalog entries carry datasheet figures (see ``catalog.py``); "this machine" is the JSON that
``tokenmill profile`` writes, with measured rather than advertised figures, and (file version 2)
a ``DecodeProfile``: the measured time of each linear kernel tokenmill runs at decode shapes and
the measured per-layer and per-step overhead around them, which ``plan`` sums instead of a roofline.
Version-1 files (no ``decode``) still load; ``plan`` then falls back to the roofline. A profile
may also hold the measured cost of the TP collectives and the overheads of the Python layers TP
runs (both optional: files without them load, and ``plan`` then leaves those terms out); catalog
entries carry their interconnect's datasheet figures (``communication.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tokenmill.bench.communication import Interconnect, interconnect_from_json
from tokenmill.errors import BenchError

PROFILE_VERSION = 2

# Compute dtype tried for each weight dtype, best first. Weight-only int8/int4 dequantize to bf16
# before the matmul, so they run at bf16 speed; fp8 has its own tensor-core rate where it exists.
COMPUTE_DTYPE_CHAIN: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32", "bf16"),
    "bf16": ("bf16", "fp16", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "fp8": ("fp8", "bf16", "fp16", "fp32"),
    "int8": ("bf16", "fp16", "fp32"),
    "int4": ("bf16", "fp16", "fp32"),
}


@dataclass(frozen=True)
class HardwareSpec:
    key: str
    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    peak_flops: dict[str, float]
    source: str
    example_price_per_hour: float | None = None
    measured: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    decode: DecodeProfile | None = None  # measured decode costs (``tokenmill profile``)
    # between TP ranks: datasheet link figures (catalog); a profile's are in ``decode``
    interconnect: Interconnect | None = None

    @property
    def communication(self) -> Interconnect | None:
        """The TP collectives' cost: measured here (``tokenmill profile``), else the catalog's."""
        if self.decode is not None and self.decode.communication is not None:
            return self.decode.communication
        return self.interconnect

    @property
    def overlaps_memory_and_compute(self) -> bool:
        """Accelerators stream weights while their matrix units compute, so a step takes the
        larger of the two times. On a CPU the same few cores do both (measured on the built-in
        model: the additive estimate was within 9-27% of `tokenmill serve`, the max() one up to
        2.2x too optimistic), so the times add up."""
        return self.extra.get("device", "gpu") != "cpu"

    def flops_for(self, weight_dtype: str | None) -> tuple[float, str]:
        """Peak FLOP/s for matmuls on weights stored as ``weight_dtype`` and the dtype it used."""
        chain = COMPUTE_DTYPE_CHAIN.get(weight_dtype or "bf16", ("bf16", "fp32"))
        for dtype in chain:
            if self.peak_flops.get(dtype):
                return self.peak_flops[dtype], dtype
        best = max(self.peak_flops.items(), key=lambda kv: kv[1])
        return best[1], best[0]


def _interp(xs: tuple[float, ...] | list[float], ys: tuple[float, ...] | list[float],
            x: float) -> float:
    """Piecewise-linear through (xs, ys); flat below the first point, the last segment's slope
    (never negative) beyond the last one."""
    if len(xs) == 1 or x <= xs[0]:
        return float(ys[0])
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return float(ys[i - 1] + w * (ys[i] - ys[i - 1]))
    slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return float(ys[-1] + slope * (x - xs[-1]))


@dataclass(frozen=True)
class KernelTable:
    """Measured seconds per call of one linear kernel: ``y = x @ W.T`` with ``x`` [M, K].

    ``shapes`` maps "KxN" to the time at each of ``rows`` (values of M), measured by running the
    built-in model's linears in model order (so each weight comes from wherever the whole model's
    weights live: cache or DRAM). ``fit`` (``call_s``, ``bytes_per_s``, ``flops_per_s``) is a
    least-squares fit of ``call_s + weight bytes / bytes_per_s + 2·M·K·N / flops_per_s`` to the
    same points, for shapes that were not measured."""

    rows: tuple[int, ...]
    shapes: dict[str, tuple[float, ...]]
    fit: dict[str, float]
    activation_dtype: str
    group_size: int | None = None  # q4 / q8: inputs per scale of the measured weights

    def fitted_seconds(self, rows: float, in_features: int, out_features: int,
                       nbytes: float) -> float:
        return (self.fit["call_s"] + nbytes / self.fit["bytes_per_s"]
                + 2.0 * rows * in_features * out_features / self.fit["flops_per_s"])

    def seconds(self, rows: float, in_features: int, out_features: int, nbytes: float) -> float:
        measured = self.shapes.get(f"{in_features}x{out_features}")
        if measured is None:
            return self.fitted_seconds(rows, in_features, out_features, nbytes)
        return _interp(self.rows, measured, rows)


@dataclass(frozen=True)
class OverheadTable:
    """What a decode step costs besides its linears, measured on the built-in model.

    ``layer_s[b][c]``: seconds per decoder layer at batch ``batches[b]`` and context
    ``contexts[c]`` for everything but its linears (norms, rotary, attention over the KV cache,
    SiLU, residual adds, per-op dispatch). ``step_s[b]``: seconds per step outside the decoder
    layers and the LM head's matmul (building inputs, embedding lookup, final norm, logits cast,
    sampling, scheduling, output processing)."""

    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    layer_s: tuple[tuple[float, ...], ...]
    step_s: tuple[float, ...]
    kv_bytes_per_token_per_layer: float  # of the model it was measured on, in its KV dtype
    weights: str = ""  # what the measured model held ("gguf:Q4_1 + gguf:Q8_0", "float32")

    def layer_seconds(self, batch: float, context: float, kv_scale: float = 1.0) -> float:
        """Per-layer overhead at ``batch`` and ``context``; ``kv_scale`` stretches the part that
        grows with the context (reading K and V) for a model with more KV bytes per token."""
        per_batch = []
        for row in self.layer_s:
            if len(self.contexts) == 1:
                per_batch.append(row[0])
                continue
            slope = max(0.0, (row[-1] - row[0]) / (self.contexts[-1] - self.contexts[0]))
            base = row[0] - slope * self.contexts[0]
            per_batch.append(max(0.0, base) + slope * kv_scale * context)
        return max(0.0, _interp(self.batches, per_batch, batch))

    def step_seconds(self, batch: float) -> float:
        return max(0.0, _interp(self.batches, self.step_s, batch))


@dataclass(frozen=True)
class ServingTable:
    """What ``tokenmill serve`` adds to each decode step: the server's measured step (ITL p50 of
    a streaming client on the same machine) minus the engine's own step for the same requests,
    measured in ``LLM.generate``, at each batch. It is a time per step, not a factor: fp32, bf16 and quantized
    servers, whose engine steps differ 3x, pay about the same (on a 2-core VM with 2 torch
    threads ~14 ms at batch 1, ~30 ms at 16: the engine thread waits for the event loop's
    detokenizing and SSE writes, and for the GIL, between steps)."""

    batches: tuple[int, ...]
    step_s: tuple[float, ...]
    context: int  # tokens in the KV cache at the middle of the measured decode
    config: str = "default"  # the serve flags measured ("default" = none)

    def seconds(self, batch: float) -> float:
        return max(0.0, _interp(self.batches, self.step_s, batch))


@dataclass(frozen=True)
class DecodeProfile:
    """Measured decode costs of this machine, by kernel ("fp32", "bf16", "q4", "q8") and by
    compute dtype (overheads)."""

    kernels: dict[str, KernelTable]
    overheads: dict[str, OverheadTable]  # "fp32", "bf16" (dense), "bf16/quantized", ...
    auto_dtype: str  # what ``--dtype auto`` picks here
    threads: int
    kernel_isa: str = ""
    model: str = ""
    serving: ServingTable | None = None  # None: engine only (``profile --no-serve``)
    # TP > 1: the all-reduce / all-gather between 2 ranks here (None: not measured)
    communication: Interconnect | None = None
    # the same overheads with the native decode stack off: the Python layers TP > 1 runs
    python_overheads: dict[str, OverheadTable] = field(default_factory=dict)

    def kernel(self, kernel: str, compute_dtype: str) -> tuple[KernelTable | None, str]:
        """The table for ``kernel`` and what was used: itself, or the nearest measured stand-in
        (fp16 -> bf16; fp8, whose CPU path dequantizes tiles for a dense matmul -> the compute
        dtype's dense kernel)."""
        for candidate in (kernel, {"fp16": "bf16", "fp8": compute_dtype}.get(kernel),
                          compute_dtype, "fp32"):
            if candidate and candidate in self.kernels:
                return self.kernels[candidate], candidate
        return None, ""

    def overhead(self, compute_dtype: str, quantized: bool = False,
                 python_layers: bool = False) -> OverheadTable | None:
        """The overhead measured on the configuration nearest to (compute dtype, quantized):
        the same one, else the same compute dtype, else the default configuration.
        ``python_layers`` (TP > 1, where the native decode stack steps aside): the overheads
        measured with it off, when the profile has them."""
        if python_layers and self.python_overheads:
            return replace(self, overheads=self.python_overheads,
                           python_overheads={}).overhead(compute_dtype, quantized)
        keys = [f"{compute_dtype}/quantized", compute_dtype] if quantized else [
            compute_dtype, f"{compute_dtype}/quantized"]
        keys += [f"{self.auto_dtype}/quantized", self.auto_dtype]
        for key in keys:
            if key in self.overheads:
                return self.overheads[key]
        return next(iter(self.overheads.values()), None)


def _decode_from_json(data: dict | None) -> DecodeProfile | None:
    if not data:
        return None
    kernels = {
        name: KernelTable(
            rows=tuple(int(r) for r in k["rows"]),
            shapes={str(s): tuple(float(v) for v in vals) for s, vals in k["shapes"].items()},
            fit={str(a): float(b) for a, b in k["fit"].items()},
            activation_dtype=str(k["activation_dtype"]),
            group_size=None if k.get("group_size") is None else int(k["group_size"]))
        for name, k in data.get("kernels", {}).items()}
    overheads = {name: _overhead_from_json(o) for name, o in data.get("overheads", {}).items()}
    python_overheads = {name: _overhead_from_json(o)
                        for name, o in (data.get("python_overheads") or {}).items()}
    serving = data.get("serving")
    if serving:
        serving = ServingTable(tuple(int(b) for b in serving["batches"]),
                               tuple(float(f) for f in serving["step_s"]),
                               int(serving["context"]), str(serving.get("config", "default")))
    return DecodeProfile(kernels, overheads, str(data.get("auto_dtype", "fp32")),
                         int(data.get("threads", 1)), str(data.get("kernel_isa", "")),
                         str(data.get("model", "")), serving or None,
                         interconnect_from_json(data.get("communication")), python_overheads)


def _overhead_from_json(o: dict) -> OverheadTable:
    return OverheadTable(
        batches=tuple(int(b) for b in o["batches"]),
        contexts=tuple(int(c) for c in o["contexts"]),
        layer_s=tuple(tuple(float(v) for v in row) for row in o["layer_s"]),
        step_s=tuple(float(v) for v in o["step_s"]),
        kv_bytes_per_token_per_layer=float(o["kv_bytes_per_token_per_layer"]),
        weights=str(o.get("weights", "")))


def default_profile_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tokenmill" / "hardware.json"


def save_profile(spec: HardwareSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": PROFILE_VERSION, **asdict(spec)}
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_profile(path: Path) -> HardwareSpec:
    if not path.is_file():
        raise BenchError(f"no hardware profile at {path}; run `tokenmill profile` first "
                         "(or pass --profile-path)")
    try:
        data = json.loads(path.read_text())
        if int(data.get("version", 1)) > PROFILE_VERSION:
            raise BenchError(f"hardware profile {path} is version {data['version']}, newer than "
                             f"this tokenmill reads ({PROFILE_VERSION}); run `tokenmill profile` "
                             "again")
        return HardwareSpec(
            key=str(data.get("key", "this-machine")),
            name=str(data["name"]),
            memory_bytes=float(data["memory_bytes"]),
            bandwidth_bytes_per_s=float(data["bandwidth_bytes_per_s"]),
            peak_flops={str(k): float(v) for k, v in data["peak_flops"].items()},
            source=str(data.get("source", f"measured by tokenmill profile ({path})")),
            example_price_per_hour=data.get("example_price_per_hour"),
            measured=True,
            extra=dict(data.get("extra", {})),
            decode=_decode_from_json(data.get("decode")),
            interconnect=interconnect_from_json(data.get("interconnect")),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BenchError(f"hardware profile {path} is unreadable ({exc}); run `tokenmill profile` "
                         "again") from exc
