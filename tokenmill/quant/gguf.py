"""GGUF's llama.cpp block formats kept as they are: Q8_0, Q4_0 and Q4_1 repacked losslessly.

A GGUF quantized row is a run of 32-element blocks (``ggml-common.h``):

* Q8_0 (34 bytes): float16 ``d``, 32 int8 ``q``;                ``w = d * q``
* Q4_0 (18 bytes): float16 ``d``, 16 bytes of nibbles;          ``w = d * (q - 8)``
* Q4_1 (20 bytes): float16 ``d``, float16 ``m``, 16 bytes;      ``w = d * q + m``

In a 4-bit block, byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high
nibble. ``QuantizedWeight`` stores element ``k`` in byte ``k // 2`` (low nibble for even ``k``), so the
nibbles are reordered; the codes and the float16 scales are kept bit for bit, which makes the result
exactly what llama.cpp (and transformers' GGUF loader) dequantize the file to.

Q5_0, Q5_1 and the K-quants Q4_K, Q5_K and Q6_K are converted into the same groups at load
(``gguf_kquants``: exactly for Q5_0/Q5_1, scales rounded to float16 for Q4_K/Q5_K, requantized to
8 bits for Q6_K). Other types (Q2_K, Q3_K, IQ*, ...): ``block_weight`` returns None for them and the
loader dequantizes them instead, naming them in the start-up log.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.quant.gguf_kquants import CONVERTED_BLOCK_TYPES, kquant_weight
from tokenmill.quant.weight import QuantizedWeight

# type name -> (bytes per 32-element block, bits, has a per-block min)
NATIVE_BLOCK_TYPES = {"Q8_0": (34, 8, False), "Q4_0": (18, 4, False), "Q4_1": (20, 4, True)}
GGUF_BLOCK = 32
# Every type ``block_weight`` turns into a QuantizedWeight rather than a float copy.
KEPT_BLOCK_TYPES = (*NATIVE_BLOCK_TYPES, *CONVERTED_BLOCK_TYPES)


def block_weight(type_name: str, data: np.ndarray, rows: int, cols: int) -> QuantizedWeight | None:
    """The ``[rows, cols]`` matrix stored as ``data`` (the file's raw bytes) as a QuantizedWeight,
    or None when ``type_name`` is not one of ``KEPT_BLOCK_TYPES``."""
    if type_name not in NATIVE_BLOCK_TYPES:
        return kquant_weight(type_name, data, rows, cols)
    block_bytes, bits, has_min = NATIVE_BLOCK_TYPES[type_name]
    if cols % GGUF_BLOCK:
        raise ValueError(f"{cols} columns is not a whole number of {GGUF_BLOCK}-element blocks")
    num_blocks = cols // GGUF_BLOCK
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, num_blocks, block_bytes)
    blocks = torch.from_numpy(raw)
    scales = blocks[:, :, 0:2].contiguous().view(torch.float16).reshape(rows, num_blocks)
    if bits == 8:
        codes = blocks[:, :, 2:].contiguous().view(torch.int8).reshape(rows, cols)
        return QuantizedWeight(8, GGUF_BLOCK, codes, scales.clone(), None, None, f"gguf:{type_name}")
    header = 4 if has_min else 2
    packed = blocks[:, :, header:]  # [rows, blocks, 16]
    low, high = packed & 0x0F, packed >> 4  # elements 0..15 and 16..31 of each block
    # element k of a block, k = 2i (+1), goes to byte i's low (high) nibble
    ordered = torch.cat((low, high), dim=-1)  # [rows, blocks, 32] in element order
    qweight = (ordered[..., 0::2] | (ordered[..., 1::2] << 4)).reshape(rows, cols // 2)
    if has_min:
        mins = blocks[:, :, 2:4].contiguous().view(torch.float16).reshape(rows, num_blocks)
    else:
        mins = scales * -8  # float16 * 8 is exact (a power of two), barring overflow at 65504/8
    return QuantizedWeight(4, GGUF_BLOCK, qweight.contiguous(), scales.clone(), mins.clone(),
                           None, f"gguf:{type_name}")
