"""RMSNorm, computed in float32 whatever the activation dtype (as the reference implementation does).

Given a ``residual`` it first adds it (``residual = hidden + residual``) and normalizes the sum,
returning both: decoder layers carry the residual stream this way (vLLM's fused_add_rms_norm), so
the add and the norm are one native call on the CPU (``kernels/fused_ops``), which updates
``residual`` in place. ``forward_reference`` is the PyTorch path, used off the CPU, when the native
ops are unavailable or off, and by tests as the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.layers.kernels.fused_ops import usable


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(hidden)``, or with a residual ``(norm(hidden + residual), hidden + residual)``."""
        ops = usable(hidden)
        if ops is not None and self.weight.dtype in (hidden.dtype, torch.float32):
            if residual is None:
                return ops.rms_norm(hidden, self.weight, self.eps)
            return ops.add_rms_norm(hidden, residual, self.weight, self.eps), residual
        return self.forward_reference(hidden, residual)

    def forward_reference(self, hidden: torch.Tensor, residual: torch.Tensor | None = None
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            residual = hidden + residual
            return self.forward_reference(residual), residual
        dtype = hidden.dtype
        hidden32 = hidden.float()
        variance = hidden32.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden32 * torch.rsqrt(variance + self.eps)).to(dtype)
