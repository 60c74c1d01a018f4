"""Gated MLP activations on a fused gate/up projection: SwiGLU (Llama, Qwen, Mistral) and GeGLU with
GELU's tanh approximation (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.kernels.fused_ops import usable


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[..., 2 * d]`` = gate then up.

    One native call on the CPU (``kernels/fused_ops``); ``forward_reference`` is the PyTorch path.
    """

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        ops = usable(gate_up)
        if ops is not None:
            return ops.silu_and_mul(gate_up)
        return self.forward_reference(gate_up)

    @staticmethod
    def forward_reference(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` (Gemma's ``gelu_pytorch_tanh``); the input is gate then up.
    PyTorch ops only: no model tokenmill serves by default uses it."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


def gated_activation(name: str) -> nn.Module:
    """The ``ArchConfig.hidden_act`` module: "silu" or "gelu_tanh"."""
    return {"silu": SiluAndMul, "gelu_tanh": GeluTanhAndMul}[name]()
