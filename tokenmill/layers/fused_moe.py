"""The routed experts of one MoE layer, computed grouped by expert.

Every expert is a SwiGLU MLP held as two linear layers (``MergedLinear``: gate+up fused, and down),
so an expert weight is anything a dense layer can be: float, GGUF Q8_0/Q4_0/Q4_1 blocks kept as
stored and run by the packed kernel, or quantized at load by ``--quantization int8/int4/fp8``.
A step's ``T x k`` (token, expert) pairs are sorted by expert, so each expert that got tokens
multiplies all of them at once: two matmuls per active expert, never a loop over tokens. The
weighted outputs are summed back per token with one ``index_add_``.

With tensor parallelism every expert is tensor-sliced like a dense MLP: each rank keeps its
``1/N`` of every expert's intermediate dimension (gate/up rows, down columns) and returns a partial
sum that the MoE block all-reduces once. Every rank routes every token the same way (the router is
replicated), so no tokens move between ranks, and a hot expert costs all ranks equally instead of
stalling the one rank that would own it under expert parallelism.

Checkpoints hold the experts either one matrix per expert (Mixtral's ``experts.N.w1``, Qwen's
``experts.N.gate_proj``), or stacked (transformers' fused ``experts.gate_up_proj [E, 2I, H]`` /
``experts.down_proj [E, H, I]``, GGUF's ``ffn_{gate,up,down}_exps``); ``load`` takes any of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.parallel_linear import ColumnParallelLinear, RowParallelLinear

PARTS = ("gate", "up", "down", "gate_up")
"""What a checkpoint tensor can hold: one projection, or gate and up already fused."""


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, device: torch.device | str,
                 parallel: ParallelContext | None = None):
        """``intermediate_size`` is the checkpoint's (whole) expert size; with ``parallel`` of N
        ranks each expert keeps ``intermediate_size / N`` of it and ``forward`` returns this
        rank's partial sum (the caller all-reduces)."""
        super().__init__()
        parallel = parallel or ParallelContext.single()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        size = intermediate_size
        self.gate_up_proj = nn.ModuleList(
            ColumnParallelLinear(hidden_size, {"gate": size, "up": size}, False, dtype, device,
                                 parallel)
            for _ in range(num_experts))
        self.down_proj = nn.ModuleList(
            RowParallelLinear(size, hidden_size, False, dtype, device, parallel,
                              reduce_results=False)
            for _ in range(num_experts))
        self.act = SiluAndMul()
        self.loaded_names: set[str] = set()
        self.routed_tokens: torch.Tensor | None = None
        """A ``[num_experts]`` int64 counter row this layer adds its routed tokens to."""

    # ------------------------------------------------------------------ loading
    def load(self, part: str, expert: int | None, tensor: Any) -> None:
        """Take ``part`` ("gate", "up", "down" or "gate_up") of one ``expert``, or of all of them
        stacked on a leading expert dimension when ``expert`` is None. Raises ValueError naming
        the expected shape."""
        if part not in PARTS:
            raise ValueError(f"unknown expert part {part!r}")
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} is out of range for num_experts="
                             f"{self.num_experts}")
        if expert is not None and part == "gate_up":
            raise ValueError("a fused gate_up_proj holds every expert, not one")
        size, hidden = self.intermediate_size, self.hidden_size
        one = {"gate": (size, hidden), "up": (size, hidden), "down": (hidden, size),
               "gate_up": (2 * size, hidden)}[part]
        expected = one if expert is not None else (self.num_experts, *one)
        if tuple(tensor.shape) != expected:
            layout = "(hidden, intermediate)" if part == "down" else "(intermediate, hidden)"
            stacked = "" if expert is not None else "(num_experts, ...) of "
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {expected} "
                             f"{stacked}{layout}")
        for index in (range(self.num_experts) if expert is None else [expert]):
            matrix = tensor if expert is not None else tensor[index]
            if part == "down":
                self.down_proj[index].load_shard("", "weight", matrix)
            elif part == "gate_up":
                self.gate_up_proj[index].load_shard("gate", "weight", matrix[:size])
                self.gate_up_proj[index].load_shard("up", "weight", matrix[size:])
            else:
                self.gate_up_proj[index].load_shard(part, "weight", matrix)
        self.loaded_names |= self.load_names_of(part, expert)

    def load_names_of(self, part: str, expert: int | None) -> set[str]:
        """What loading ``part`` of ``expert`` (None: all) provides, as ``"<expert>.<proj>"``."""
        experts = range(self.num_experts) if expert is None else [expert]
        parts = ("gate", "up") if part == "gate_up" else (part,)
        return {f"{e}.{p}_proj" for e in experts for p in parts}

    def missing_load_names(self) -> list[str]:
        expected = self.load_names_of("gate_up", None) | self.load_names_of("down", None)
        return sorted(expected - self.loaded_names, key=lambda n: (int(n.split(".")[0]), n))

    # ------------------------------------------------------------------ compute
    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
                ) -> torch.Tensor:
        """``sum_j weights[t, j] * expert[expert_ids[t, j]](hidden[t])`` for every token ``t``."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)
        # a stable sort keeps each expert's tokens in token order: deterministic sums
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        if self.routed_tokens is not None:
            self.routed_tokens += counts
        token_ids = order // top_k
        grouped = hidden.index_select(0, token_ids)  # [T*k, H], grouped by expert
        out = torch.empty_like(grouped)
        start = 0
        for expert, num in enumerate(counts.tolist()):  # experts that got tokens, not tokens
            if num == 0:
                continue
            rows = slice(start, start + num)
            gate_up = self.gate_up_proj[expert](grouped[rows])
            out[rows] = self.down_proj[expert](self.act(gate_up))
            start += num
        out *= weights.reshape(-1).index_select(0, order).to(out.dtype).unsqueeze(1)
        result = torch.zeros_like(hidden)
        result.index_add_(0, token_ids, out)
        return result
