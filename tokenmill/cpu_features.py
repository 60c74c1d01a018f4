"""What this CPU's instruction set offers, read once from /proc/cpuinfo (Linux x86-64).

Machines of one kind differ (one has AMX, the next AVX-512 only, another AVX2), so defaults that
depend on the instruction set are decided here at start-up and reported in the banner.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_bf16_compute() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 dot products or AMX tiles)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
