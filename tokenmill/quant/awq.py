"""AWQ "gemm" checkpoints (AutoAWQ, llm-compressor's AWQ export) -> ``QuantizedWeight``.

Each quantized linear layer ``<prefix>`` is stored as

* ``qweight`` int32 ``[K, N / 8]``: eight codes per word along N, in AWQ's interleaved order: nibble
  ``i`` of word ``c`` holds output ``8 * c + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``
  (it lets the GEMM kernel unpack pairs of halves with one shift);
* ``qzeros`` int32 ``[K / group, N / 8]``: the zero points, packed the same way;
* ``scales`` float16 ``[K / group, N]``;

and ``w[n, k] = scales[k // group, n] * (q[k, n] - zero[k // group, n])``. Groups are always
contiguous, so no input permutation is needed; the conversion is lossless apart from rounding
``-scale * zero`` to float16 once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import CorruptModelFileError, UnsupportedModelError
from tokenmill.quant.int32_packing import (
    CODES_PER_WORD,
    expect_tensor,
    pack_codes,
    unpack_nibbles,
    zero_point_mins,
)
from tokenmill.quant.weight import BLOCK, QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its eight
# column c of the eight sits in nibble AWQ_REVERSE_ORDER[c]
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(CODES_PER_WORD))
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AwqFormat:
    """The settings of one AWQ checkpoint that decide how its tensors are read."""

    group_size: int  # -1: one group over all of K
    name: str = "awq"
    required_parts: frozenset[str] = frozenset({"qweight", "qzeros", "scales"})
    optional_parts: frozenset[str] = frozenset()
    dropped_parts: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path | str) -> AwqFormat:
        # AutoAWQ's older quant_config.json spells the fields w_bit / q_group_size
        bits = config.get("bits", config.get("w_bit", 4))
        if bits != 4:
            raise UnsupportedModelError(f"{where}: quantization_config bits={bits} is not "
                                        "supported; tokenmill reads 4-bit AWQ checkpoints")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(f"{where}: AWQ version {version!r} is not supported "
                                        "(tokenmill reads the 'gemm' layout)")
        if not config.get("zero_point", True):
            raise UnsupportedModelError(f"{where}: AWQ zero_point=false is not supported "
                                        "(tokenmill reads checkpoints with zero points)")
        group_size = int(config.get("group_size", config.get("q_group_size", 128)))
        if group_size != -1 and (group_size <= 0 or group_size % BLOCK):
            raise UnsupportedModelError(f"{where}: quantization_config group_size={group_size} is "
                                        f"not supported (a multiple of {BLOCK}, or -1)")
        return cls(group_size)

    def is_part(self, part: str, tensor: torch.Tensor) -> bool:
        return part in self.required_parts

    def convert(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        return awq_weight(prefix, parts, self.group_size)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N / 8]`` in AWQ order -> uint8 codes ``[R, N]`` in column order."""
    nibbles = unpack_nibbles(words).view(words.shape[0], -1, CODES_PER_WORD)
    return nibbles[:, :, list(AWQ_REVERSE_ORDER)].reshape(words.shape[0], -1)


def awq_weight(prefix: str, parts: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    """One layer's ``qweight``/``qzeros``/``scales`` as a ``QuantizedWeight``."""
    qweight = parts["qweight"]
    if qweight.dim() != 2:
        raise CorruptModelFileError(f"{prefix}.qweight has shape {tuple(qweight.shape)}, "
                                    "expected 2 dimensions (K, N / 8)")
    num_inputs, num_outputs = qweight.shape[0], qweight.shape[1] * CODES_PER_WORD
    group = num_inputs if group_size == -1 else group_size
    if num_inputs % group or group % BLOCK:
        raise UnsupportedModelError(
            f"{prefix}.qweight has shape {tuple(qweight.shape)}: {num_inputs} inputs must be a "
            f"whole number of groups of {group} (a multiple of {BLOCK})")
    num_groups = num_inputs // group
    expect_tensor(f"{prefix}.qweight", qweight, tuple(qweight.shape), (torch.int32,))
    expect_tensor(f"{prefix}.qzeros", parts["qzeros"], (num_groups, num_outputs // CODES_PER_WORD),
                  (torch.int32,))
    expect_tensor(f"{prefix}.scales", parts["scales"], (num_groups, num_outputs), SCALE_DTYPES)

    codes = unpack_awq(qweight).T.contiguous()  # [N, K]
    zeros = unpack_awq(parts["qzeros"]).T  # [N, G]
    scales = parts["scales"].to(torch.float16).T.contiguous()  # [N, G]
    return QuantizedWeight(4, group, pack_codes(codes), scales,
                           zero_point_mins(scales, zeros).contiguous(), None, "awq")
