"""Per-level summary of request results: throughput, latency percentiles, goodput, errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.bench.client import RequestResult
from tokenmill.errors import BenchError

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """A request is "good" when it meets every limit given (seconds; None = no limit)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise BenchError(f"SLO {name[:-2]} must be a positive number of ms, got {value}")

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.e2e_s))

    def is_met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        tpot = r.tpot_s
        return ((self.ttft_s is None or (r.ttft_s is not None and r.ttft_s <= self.ttft_s))
                and (self.tpot_s is None or tpot is None or tpot <= self.tpot_s)
                and (self.e2e_s is None or (r.e2e_s is not None and r.e2e_s <= self.e2e_s)))

    def to_json(self) -> dict[str, float | None]:
        return {"ttft_ms": _ms(self.ttft_s), "tpot_ms": _ms(self.tpot_s), "e2e_ms": _ms(self.e2e_s)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def latency_stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    stats: dict[str, float | None] = {"mean": float(arr.mean())}
    for p in PERCENTILES:
        stats[f"p{p}"] = float(np.percentile(arr, p))
    return stats


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO) -> dict[str, Any]:
    """Numbers for one load level. ``duration_s`` runs from the first send to the last answer."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.error_kind for r in results if not r.ok)
    duration = max(duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(1 for r in ok if slo.is_met(r)) if slo.is_set else None
    first_error = next((f"{r.error_kind}: {r.error_message}" for r in results if not r.ok), None)
    return {
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_errors": len(results) - len(ok),
        "errors_by_kind": dict(errors),
        "first_error": first_error,
        "error_rate": (len(results) - len(ok)) / len(results) if results else 0.0,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_per_s": input_tokens / duration,
        "output_tokens_per_s": output_tokens / duration,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration,
        "ttft_ms": latency_stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": latency_stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": latency_stats_ms([x for r in ok for x in r.itls_s]),
        "e2e_ms": latency_stats_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "good_requests": good,
        "goodput": None if good is None else good / duration,
        "slo_attainment": None if good is None or not results else good / len(results),
        "usage_reported": bool(ok) and all(r.output_tokens_source == "usage" for r in ok),
    }
