"""The price a bench report charges: the user's ``--price-per-hour``, or a catalog example.

The arithmetic from a price to dollars per token is ``tokenmill/cost.py``, shared with the server.
"""

from __future__ import annotations

from tokenmill.cost import Price, hourly_price
from tokenmill.errors import BenchError, ConfigError


def resolve_price(price_per_hour: float | None, hardware: str | None,
                  num_devices: int = 1) -> Price | None:
    """``--price-per-hour`` wins; else a catalog entry's example price times the device count."""
    if num_devices < 1:
        raise BenchError(f"--num-devices={num_devices} must be at least 1")
    if price_per_hour is not None:
        try:
            return hourly_price(price_per_hour)
        except ConfigError as exc:
            raise BenchError(exc.message) from None
    if hardware is None:
        return None
    from tokenmill.bench.catalog import find_hardware

    spec = find_hardware(hardware)
    if spec.example_price_per_hour is None:
        raise BenchError(f"{spec.name} has no example price; pass --price-per-hour")
    return Price(spec.example_price_per_hour * num_devices,
                 f"example: {spec.name} x {num_devices} (illustrative, not a quote)")
