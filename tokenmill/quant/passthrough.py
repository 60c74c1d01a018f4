"""``auto`` (keep what the checkpoint holds) and ``none`` (dequantize everything to the compute dtype)."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.quant.registry import register, to_dense


class KeepCheckpointFormat:
    name = "auto"

    def prepare(self, name: str, weight: Any, dtype: torch.dtype) -> Any:
        return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight


class Dequantize:
    name = "none"

    def prepare(self, name: str, weight: Any, dtype: torch.dtype) -> torch.Tensor:
        return to_dense(weight, dtype)


register("auto")(lambda group_size: KeepCheckpointFormat())
register("none")(lambda group_size: Dequantize())
