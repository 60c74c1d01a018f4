"""The sparse MLP of an MoE decoder layer: router, routed experts, and Qwen2-MoE's shared expert.

``out = sum over top-k experts e of w_e * expert_e(x)``, plus, when the family has one,
``sigmoid(x @ shared_expert_gate.T) * shared_expert(x)``.

With tensor parallelism the routed experts and the shared expert each give this rank's partial
sum, and the block all-reduces their total once (one all-reduce per layer's MLP, as a dense MLP).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.layers.fused_moe import FusedMoE
from tokenmill.layers.moe_router import TopKRouter
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.llama import LlamaMLP
from tokenmill.quant.registry import to_dense


class SparseMoeBlock(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str,
                 parallel: ParallelContext | None = None):
        super().__init__()
        moe = arch.moe
        assert moe is not None
        self.parallel = parallel = parallel or ParallelContext.single()
        self.gate = TopKRouter(arch.hidden_size, moe.num_experts, moe.num_experts_per_tok,
                               moe.norm_topk_prob, dtype, device)
        self.experts = FusedMoE(moe.num_experts, arch.hidden_size, moe.moe_intermediate_size,
                                dtype, device, parallel)
        self.shared_expert: LlamaMLP | None = None
        self.shared_expert_gate: nn.Parameter | None = None
        if moe.has_shared_expert:
            self.shared_expert = LlamaMLP(arch, dtype, device,
                                          intermediate_size=moe.shared_expert_intermediate_size,
                                          parallel=parallel, reduce_results=False)
            self.shared_expert_gate = nn.Parameter(
                torch.empty(1, arch.hidden_size, dtype=dtype, device=device), requires_grad=False)

    def load_shared_expert_gate(self, tensor: Any) -> None:
        if self.shared_expert_gate is None:
            raise ValueError("this model has no shared expert")
        dense = to_dense(tensor, self.shared_expert_gate.dtype)
        if dense.dim() == 1:  # GGUF stores ffn_gate_inp_shexp as a vector
            dense = dense.unsqueeze(0)
        if tuple(dense.shape) != tuple(self.shared_expert_gate.shape):
            raise ValueError(f"shape {tuple(dense.shape)}, expected "
                             f"{tuple(self.shared_expert_gate.shape)}")
        self.shared_expert_gate.data.copy_(dense)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(hidden)
        out = self.experts(hidden, weights, expert_ids)
        if self.shared_expert is not None:
            gate = torch.sigmoid(torch.nn.functional.linear(hidden, self.shared_expert_gate))
            out += gate * self.shared_expert(hidden)
        return self.parallel.all_reduce(out)
