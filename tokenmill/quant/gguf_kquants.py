"""GGUF's 5-bit and K-quant block types converted at load into the kernels' 32-element groups.

The kernels read 4-bit codes (0..15) or 8-bit codes (-128..127) in groups of 32 inputs, each group
with a float16 scale and an optional float16 offset (``QuantizedWeight``). What each type becomes,
following the layouts in llama.cpp's ``ggml-common.h`` (and gguf-py's ``quants.py``, which the tests
compare against):

* **Q5_0** (22 bytes per 32): float16 ``d``, 32 high bits, 16 bytes of low nibbles;
  ``w = d * (q - 16)``. Kept **exactly**: 8-bit codes ``q - 16`` with scale ``d``.
* **Q5_1** (24 bytes per 32): float16 ``d`` and ``m``, high bits, nibbles; ``w = d * q + m``. Kept
  **exactly**: 8-bit codes ``q``, scale ``d``, offset ``m``.
* **Q4_K** (144 bytes per 256): float16 ``d`` and ``dmin``, twelve bytes packing eight 6-bit scales
  ``sc`` and mins ``m``, 128 bytes of nibbles; sub-block ``j`` of 32 is ``w = d*sc[j] * q -
  dmin*m[j]``. Becomes 4-bit codes with scale ``d*sc[j]`` and offset ``-dmin*m[j]``; those two
  products need up to 17 significant bits and are rounded to float16 (11), so every weight is
  within 2^-11 of its sub-block's scale and offset of the file's value: about 1/200 of one
  quantization step.
* **Q5_K** (176 bytes per 256): as Q4_K with a fifth bit per code; 8-bit codes 0..31, the same
  float16 rounding of scale and offset.
* **Q6_K** (210 bytes per 256): sixteen sub-blocks of 16 with int8 scales, ``w = d*sc[j] * (q -
  32)``. Two sub-blocks with different scales cannot share one group scale exactly, so each group
  of 32 is **requantized** to 8 bits the way llama.cpp makes Q8_0 blocks: scale ``max|w| / 127``
  (float16), codes rounded to nearest. Each weight moves by at most 0.56 of that step, about 1/7
  of a Q6_K step where the two sub-blocks' scales are alike.

Q5 codes take a byte each (the file's 5.5-6 bits become 9-10 bits with the float16 scale and
offset), still a quarter of float32. Other types (Q2_K, Q3_K, the IQ types) are not converted:
``kquant_weight`` returns None and the loader dequantizes them, naming them in its log.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.quant.weight import QuantizedWeight

SUPER_BLOCK = 256  # elements per K-quant super-block (QK_K)
GROUP = 32  # elements per kernel group, and per Q5_0 / Q5_1 block

# type name -> (elements per block, bytes per block)
CONVERTED_BLOCK_TYPES = {
    "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
# How each type is kept, for the start-up log.
CONVERSION = {
    "Q5_0": "exactly, as 8-bit codes", "Q5_1": "exactly, as 8-bit codes",
    "Q4_K": "as 4-bit codes, scales rounded to float16",
    "Q5_K": "as 8-bit codes, scales rounded to float16",
    "Q6_K": "requantized to 8 bits per 32 weights",
}


def kquant_weight(type_name: str, data: np.ndarray, rows: int, cols: int
                  ) -> QuantizedWeight | None:
    """The ``[rows, cols]`` matrix stored as ``data`` (the file's raw bytes) in the kernels' form,
    or None when ``type_name`` is not one of ``CONVERTED_BLOCK_TYPES`` (or a scale does not fit
    a float16), so that the loader dequantizes it instead."""
    if type_name not in CONVERTED_BLOCK_TYPES:
        return None
    block_elems, block_bytes = CONVERTED_BLOCK_TYPES[type_name]
    if cols % block_elems:
        raise ValueError(f"{cols} columns is not a whole number of {block_elems}-element "
                         f"{type_name} blocks")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows * (cols // block_elems),
                                                                 block_bytes)
    decode = _DECODERS[type_name]
    codes, scales, mins = decode(blocks)  # codes [blocks, elems], scales/mins [blocks, groups]
    groups = cols // GROUP
    scales16 = _float16(scales).reshape(rows, groups)
    offsets = None if mins is None else _float16(mins).reshape(rows, groups)
    if not (scales16.isfinite().all() and (offsets is None or offsets.isfinite().all())):
        return None  # a scale beyond float16's range: left to the dequantizer
    source = f"gguf:{type_name}"
    if type_name == "Q4_K":
        nibbles = codes.reshape(rows, cols).astype(np.uint8)
        packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)  # element k in byte k // 2
        return QuantizedWeight(4, GROUP, torch.from_numpy(np.ascontiguousarray(packed)),
                               scales16, offsets, None, source)
    qweight = torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, cols).astype(np.int8)))
    return QuantizedWeight(8, GROUP, qweight, scales16, offsets, None, source)


def _float16(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.float16)


def _halves(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32 ``[blocks, 1]``."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _low_high_nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes ``[blocks, chunks, 32]`` -> 4-bit values ``[blocks, chunks * 64]``: each chunk of 32
    bytes holds 64 elements, the first 32 in the low nibbles and the next 32 in the high ones."""
    low, high = packed & 0x0F, packed >> 4
    return np.concatenate((low, high), axis=-1).reshape(packed.shape[0], -1)


def _q5_legacy(blocks: np.ndarray, has_min: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    header = 4 if has_min else 2
    d = _halves(blocks, 0)
    high_bits = blocks[:, header:header + 4].copy().view(np.uint32)  # [blocks, 1]
    fifth = ((high_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)
    q = _low_high_nibbles(blocks[:, header + 4:].reshape(-1, 1, 16)).astype(np.int16)
    q = q | (fifth << 4)
    if has_min:
        return q, d, _halves(blocks, 2)
    return q - 16, d, None


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: per 32-element sub-block, scale ``d * sc`` and offset ``-dmin * m`` (float32,
    exact), unpacked from the twelve bytes that hold eight 6-bit ``sc`` and eight 6-bit ``m``."""
    d, dmin = _halves(blocks, 0), _halves(blocks, 2)
    packed = blocks[:, 4:16].reshape(-1, 3, 4)
    first, second, last = packed[:, 0], packed[:, 1], packed[:, 2]
    sc = np.concatenate((first & 0x3F, (last & 0x0F) | ((first >> 2) & 0x30)), axis=-1)
    m = np.concatenate((second & 0x3F, (last >> 4) | ((second >> 2) & 0x30)), axis=-1)
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, mins = _k_scales(blocks)
    q = _low_high_nibbles(blocks[:, 16:].reshape(-1, 4, 32))
    return q, scales, mins


def _q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, mins = _k_scales(blocks)
    high = blocks[:, 16:48]  # bit j of byte i: the fifth bit of element 32 * j + i
    fifth = ((high[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1)
    q = _low_high_nibbles(blocks[:, 48:].reshape(-1, 4, 32)).astype(np.int16)
    return q | (fifth.reshape(q.shape).astype(np.int16) << 4), scales, mins


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    n = blocks.shape[0]
    low = blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    low = (low & 0x0F).reshape(n, 2, 128)  # per half of 128: elements 0..63 then 64..127
    high = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 1, 4, 1)
    high = (high & 0x03).reshape(n, 2, 128)
    q = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
    sub_scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # 16 per block
    step = _halves(blocks, 208) * sub_scales  # [n, 16], exact in float32
    w = (q.reshape(n, 16, 16).astype(np.float32) * step[:, :, None]).reshape(n, 8, GROUP)
    return _requantize_int8(w)


def _requantize_int8(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """8-bit codes for ``[n, g, 32]`` weights the way llama.cpp makes Q8_0 blocks
    (``quantize_row_q8_0``): ``d = max|w| / 127`` kept as float16, codes ``round(w / d)`` (halves
    away from zero) computed with the unrounded ``d``. Each weight moves by at most half a step plus
    the float16 rounding of ``d`` over 127 codes: ``(0.5 + 127 * 2^-11) * d``."""
    d = np.abs(groups).max(axis=-1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    scaled = groups * inverse
    codes = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
    scale = d[..., 0].astype(np.float16).astype(np.float32)
    return codes.astype(np.int16).reshape(groups.shape[0], -1), scale, None


_DECODERS = {
    "Q5_0": lambda blocks: _q5_legacy(blocks, has_min=False),
    "Q5_1": lambda blocks: _q5_legacy(blocks, has_min=True),
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
