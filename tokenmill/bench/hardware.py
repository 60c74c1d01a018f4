"""A device the planner can put a model on: memory, bandwidth and peak FLOP/s per dtype.

Catalog entries carry datasheet figures (see ``catalog.py``); "this machine" is the JSON that
``tokenmill profile`` writes, with measured rather than advertised figures.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenmill.errors import BenchError

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


def default_profile_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tokenmill" / "hardware.json"


def save_profile(spec: HardwareSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(spec), indent=2) + "\n")


def load_profile(path: Path) -> HardwareSpec:
    if not path.is_file():
        raise BenchError(f"no hardware profile at {path}; run `tokenmill profile` first "
                         "(or pass --profile-path)")
    try:
        data = json.loads(path.read_text())
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
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BenchError(f"hardware profile {path} is unreadable ({exc}); run `tokenmill profile` "
                         "again") from exc
