"""Random but well-formed GGUF block bytes, written from the layouts in llama.cpp's ``ggml-common.h``.

Every bit pattern of codes, packed sub-block scales and high bits is a valid block, so those bytes
are drawn at random; only the float16 super-scales are set, to finite values of a chosen size
(random bytes would give infinities and NaNs). The gguf package's ``dequantize`` is the reference
such blocks are compared against: its readers, not tokenmill's, define what they mean.
"""

from __future__ import annotations

import numpy as np

# type name -> (elements per block, bytes per block, {byte offset of a float16: its size})
BLOCK_LAYOUTS = {
    "Q5_0": (32, 22, {0: 0.02}),
    "Q5_1": (32, 24, {0: 0.01, 2: -0.15}),
    "Q2_K": (256, 84, {80: 0.004, 82: 0.002}),
    "Q3_K": (256, 110, {108: 0.0004}),
    "Q4_K": (256, 144, {0: 0.0002, 2: 0.0008}),
    "Q5_K": (256, 176, {0: 0.0001, 2: 0.0008}),
    "Q6_K": (256, 210, {208: 0.0001}),
}


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """``[rows, bytes per row]`` uint8 of ``type_name`` blocks; each float16 super-scale is its
    layout's size times a uniform draw from 0.5..1.5 (keeping its sign)."""
    elements, block_bytes, halves = BLOCK_LAYOUTS[type_name]
    assert cols % elements == 0, (type_name, cols)
    rng = np.random.default_rng(seed)
    count = rows * cols // elements
    blocks = rng.integers(0, 256, (count, block_bytes), dtype=np.uint8)
    for offset, size in halves.items():
        values = (size * rng.uniform(0.5, 1.5, count)).astype(np.float16)
        blocks[:, offset:offset + 2] = values.view(np.uint8).reshape(count, 2)
    return blocks.reshape(rows, -1)
