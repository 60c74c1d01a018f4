"""Native CPU kernels, compiled on first use with torch's C++ extension builder (gcc + ninja).

PyTorch has no operator that attends through a block table without first gathering the blocks
into a new tensor; on a CPU that copy (plus reading it again) is most of a decode step's memory
traffic at large batch. The kernel here reads K/V in place. Building takes about a minute once per
machine (cached under ``TORCH_EXTENSIONS_DIR``); if it cannot be built the engine falls back to the
PyTorch path and says so once.
"""

from __future__ import annotations

from typing import Any

from tokenmill.layers.kernels.extension import native_module


def paged_attention_module() -> Any | None:
    """The compiled kernels (``paged_decode_attention``), or None when they cannot be built."""
    return native_module()
