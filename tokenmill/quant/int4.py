"""Weight-only INT4 for any model: asymmetric codes 0..15 with a scale and a min per group of inputs.

``w = scale * q + min`` with ``min`` = the group's smallest weight and ``scale`` = range / 15 (the
layout of GGUF Q4_1 and of GPTQ/AWQ with zero points, so all three run in the same kernel).
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.quant.registry import register, to_dense
from tokenmill.quant.weight import QuantizedWeight


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> QuantizedWeight:
    """``weight`` [N, K] -> 4-bit codes, float16 scale and min per ``group_size`` inputs."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // group_size, group_size)
    low = w.amin(dim=-1)
    high = w.amax(dim=-1)
    scales = ((high - low) / 15.0).clamp(min=1e-10).to(torch.float16)
    mins = low.to(torch.float16)
    codes = torch.round((w - mins.float().unsqueeze(-1)) / scales.float().unsqueeze(-1))
    codes = codes.clamp(0, 15).to(torch.uint8).reshape(rows, cols)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return QuantizedWeight(4, group_size, packed.contiguous(), scales, mins, None, "int4")


class Int4WeightOnly:
    name = "int4"

    def __init__(self, group_size: int):
        self.group_size = group_size

    def prepare(self, name: str, weight: Any, dtype: torch.dtype) -> Any:
        dense = to_dense(weight, torch.float32)
        if dense.shape[1] % self.group_size:
            return dense.to(dtype)  # K not a whole number of groups; keep it dense
        return quantize_int4(dense, self.group_size)


register("int4")(lambda group_size: Int4WeightOnly(group_size))
