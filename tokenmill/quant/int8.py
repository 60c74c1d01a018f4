"""Weight-only INT8 for any model: one symmetric scale per output channel, ``w = scale * q``.

Per-channel absmax keeps the error of each weight within half a step of its row's largest magnitude
/ 127, which on Llama-family layers moves logits far less than 4-bit does (see benchmarks/perplexity.py).
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.quant.registry import register, to_dense
from tokenmill.quant.weight import BLOCK, QuantizedWeight


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """``weight`` [N, K] -> int8 codes with a float16 scale per row (or per ``group_size`` inputs)."""
    rows, cols = weight.shape
    group = group_size or cols
    w = weight.float().reshape(rows, cols // group, group)
    scales = (w.abs().amax(dim=-1) / 127.0).clamp(min=1e-10).to(torch.float16)
    codes = torch.round(w / scales.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(8, group, codes.reshape(rows, cols), scales, None, None, "int8")


class Int8WeightOnly:
    name = "int8"

    def prepare(self, name: str, weight: Any, dtype: torch.dtype) -> Any:
        dense = to_dense(weight, torch.float32)
        if dense.shape[1] % BLOCK:
            return dense.to(dtype)  # the kernels need whole 32-element blocks; keep it dense
        return quantize_int8(dense)


register("int8")(lambda group_size: Int8WeightOnly())
