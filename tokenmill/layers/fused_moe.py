"""The routed experts of one MoE layer, computed grouped by expert.

Every expert is a SwiGLU MLP. Their weights are stacked: ``w13 [E, 2I, H]`` (gate rows, then up
rows, as transformers' fused ``gate_up_proj``) and ``w2 [E, H, I]``. A step's ``T x k`` (token,
expert) pairs are sorted by expert, so each expert that got tokens multiplies all of them at once:
two matmuls per active expert, never a loop over tokens. The weighted outputs are summed back per
token with one ``index_add_``.

Checkpoints hold the experts either one matrix per expert (Mixtral's ``experts.N.w1``, Qwen's
``experts.N.gate_proj``), or stacked (transformers' fused ``experts.gate_up_proj`` /
``experts.down_proj``, GGUF's ``ffn_{gate,up,down}_exps``); ``load`` takes any of them.
Expert weights are held dense in the model's dtype: a quantized checkpoint's experts are
dequantized at load (there is no grouped quantized-expert kernel yet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.activation import SiluAndMul
from tokenmill.quant.registry import to_dense

PARTS = ("gate", "up", "down", "gate_up")
"""What a checkpoint tensor can hold: one projection, or gate and up already fused."""


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size,
                                            dtype=dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size,
                                           dtype=dtype, device=device), requires_grad=False)
        self.act = SiluAndMul()
        self.loaded_names: set[str] = set()
        self.routed_tokens: torch.Tensor | None = None
        """A ``[num_experts]`` int64 counter row this layer adds its routed tokens to."""

    # ------------------------------------------------------------------ loading
    def load(self, part: str, expert: int | None, tensor: Any) -> None:
        """Copy ``part`` ("gate", "up", "down" or "gate_up") of one ``expert``, or of all of them
        stacked when ``expert`` is None. Raises ValueError naming the expected shape."""
        if part not in PARTS:
            raise ValueError(f"unknown expert part {part!r}")
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} is out of range for num_experts="
                             f"{self.num_experts}")
        if expert is not None and part == "gate_up":
            raise ValueError("a fused gate_up_proj holds every expert, not one")
        size = self.intermediate_size
        target = {"gate": self.w13[:, :size], "up": self.w13[:, size:], "down": self.w2,
                  "gate_up": self.w13}[part]
        if expert is not None:
            target = target[expert]
        dense = to_dense(tensor, self.w13.dtype)
        if tuple(dense.shape) != tuple(target.shape):
            layout = "(hidden, intermediate)" if part == "down" else "(intermediate, hidden)"
            stacked = "" if expert is not None else "(num_experts, ...) of "
            raise ValueError(f"shape {tuple(dense.shape)}, expected {tuple(target.shape)} "
                             f"{stacked}{layout}")
        target.copy_(dense)
        self.loaded_names |= self.load_names_of(part, expert)

    def load_names_of(self, part: str, expert: int | None) -> set[str]:
        """What loading ``part`` of ``expert`` (None: all) provides, as ``"<expert>.<proj>"``."""
        experts = range(self.num_experts) if expert is None else [expert]
        parts = ("gate", "up") if part == "gate_up" else (part,)
        return {f"{e}.{p}_proj" for e in experts for p in parts}

    def missing_load_names(self) -> list[str]:
        expected = self.load_names_of("gate_up", None) | self.load_names_of("down", None)
        return sorted(expected - self.loaded_names, key=lambda n: (int(n.split(".")[0]), n))

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.w13, self.w2))

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
            gate_up = torch.nn.functional.linear(grouped[rows], self.w13[expert])
            out[rows] = torch.nn.functional.linear(self.act(gate_up), self.w2[expert])
            start += num
        out *= weights.reshape(-1).index_select(0, order).to(out.dtype).unsqueeze(1)
        result = torch.zeros_like(hidden)
        result.index_add_(0, token_ids, out)
        return result
