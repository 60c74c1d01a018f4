"""Linear layers that fuse several checkpoint matrices into one matmul (q/k/v, gate/up).

Checkpoints store ``q_proj``, ``k_proj``, ``v_proj`` separately; one fused matrix reads the input once
per step instead of three times. ``load_shard`` copies each checkpoint tensor into its rows.
"""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Module):
    """``y = x @ W.T (+ b)`` where W stacks the output rows of several named shards."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(offset, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)

    def load_shard(self, shard: str, kind: str, tensor: torch.Tensor) -> None:
        start, size = self.shard_offsets[shard]
        target = self.weight if kind == "weight" else self.bias
        if target is None or tensor.shape[0] != size:
            raise ValueError(f"shard {shard}.{kind} has shape {tuple(tensor.shape)}, expected "
                             f"{size} rows")
        target.data[start:start + size].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class Linear(MergedLinear):
    """A plain linear layer (one shard), loadable the same way as the merged ones."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__(in_features, {"": out_features}, bias, dtype, device)
