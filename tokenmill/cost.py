"""Dollars per million tokens from a machine's hourly price and a measured token rate.

The machine costs the same per hour whether it is busy or idle, so cost per token is
``price per second ÷ tokens per second``: it falls as load (utilization) rises until the server
saturates. "$ per 1M output tokens" charges the whole machine-hour to output tokens (the usual
way serving costs are quoted); "$ per 1M input tokens" does the same for input; the blended figure
divides by both together. They are three views of one bill, not three bills to add up.

``tokenmill bench`` (per load level) and the server's live cost metrics both use this arithmetic;
the catalog's example prices are the bench's business (``tokenmill/bench/pricing.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ConfigError


@dataclass(frozen=True)
class Price:
    per_hour: float  # for the whole deployment (all devices)
    source: str  # "user" or "example: <catalog entry> x N"

    @property
    def is_example(self) -> bool:
        return self.source.startswith("example")


def hourly_price(price_per_hour: float) -> Price:
    """A price the user gave (``--price-per-hour``), checked: finite and >= 0."""
    if math.isnan(price_per_hour) or price_per_hour < 0 or math.isinf(price_per_hour):
        raise ConfigError(f"--price-per-hour={price_per_hour} must be a finite number >= 0",
                          param="price_per_hour")
    return Price(price_per_hour, "user")


def level_cost(summary: dict[str, Any], price: Price) -> dict[str, float | None]:
    per_second = price.per_hour / 3600.0
    out_tps = summary["output_tokens_per_s"]
    in_tps = summary["input_tokens_per_s"]
    total_tps = out_tps + in_tps

    def per_million(tps: float) -> float | None:
        return per_second / tps * 1e6 if tps > 0 else None

    def per_dollar(tps: float) -> float | None:
        return tps / per_second if per_second > 0 else None

    return {
        "price_per_hour": price.per_hour,
        "dollars_per_million_output_tokens": per_million(out_tps),
        "dollars_per_million_input_tokens": per_million(in_tps),
        "dollars_per_million_tokens": per_million(total_tps),
        "output_tokens_per_dollar": per_dollar(out_tps),
        "tokens_per_dollar": per_dollar(total_tps),
    }
