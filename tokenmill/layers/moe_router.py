"""The MoE router: which experts each token goes to, and with what weight.

Mixtral, Qwen2-MoE and Qwen3-MoE all route the same way: ``softmax`` over the router's logits (in
float32, as transformers does), ``top-k``, then renormalize the k probabilities to sum to one only
when the family says so (``norm_topk_prob``). The router stays in float whatever the quantization
method: a quantized router could flip a near-tie top-k choice, and it is a tiny matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.quant.registry import to_dense


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] float32, expert_ids [T, k] int64)``, best expert first."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


class TopKRouter(nn.Module):
    """``logits = x @ W.T`` with ``W [num_experts, hidden]``, then ``route``."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype,
                                               device=device), requires_grad=False)

    def load(self, tensor: Any) -> None:
        dense = to_dense(tensor, self.weight.dtype)
        if tuple(dense.shape) != tuple(self.weight.shape):
            raise ValueError(f"shape {tuple(dense.shape)}, expected {tuple(self.weight.shape)} "
                             "(num_experts, hidden_size)")
        self.weight.data.copy_(dense)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(F.linear(hidden, self.weight), self.top_k, self.renormalize)
