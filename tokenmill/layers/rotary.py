"""Rotary position embeddings (rotate-half form), with the linear, llama3 and YaRN scaling variants
(llama3 also as explicit per-frequency factors, the form GGUF files carry it in).

On the CPU the rotation is one native call (``kernels/fused_ops``) that rotates query and key in
place, instead of a dozen small torch ops; ``forward_reference`` is the PyTorch path (new tensors).

The layer takes plain numbers (``RopeScaling`` is the layer's own parameter record); a model's
``ArchConfig`` holds one, filled by the loaders: layers never import models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.layers.kernels.fused_ops import usable


@dataclass(frozen=True)
class RopeScaling:
    """A rotary scaling variant declared by the model (``rope_type`` as Hugging Face names it)."""

    rope_type: str = "default"  # default | linear | llama3 | yarn | freq_factors
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 and yarn
    # yarn only (Qwen2.5 / Qwen3 long context): the frequencies between beta_fast and beta_slow
    # rotations over the original context are blended from kept to interpolated ones, and cos/sin
    # are scaled by attention_factor (None: 0.1 ln(factor) + 1, the paper's choice)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    # freq_factors only: one divisor per rotary frequency, as a GGUF file's ``rope_freqs`` tensor
    # holds them (llama.cpp's converter writes Llama 3's scaling that way, not as metadata)
    freq_factors: tuple[float, ...] = ()


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "freq_factors":
        factors = torch.tensor(scaling.freq_factors, dtype=torch.float64)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"{len(scaling.freq_factors)} rope frequency factors for "
                             f"{inv_freq.numel()} frequencies")
        return inv_freq / factors
    if scaling.rope_type == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
        low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)
    if scaling.rope_type == "yarn":
        return _yarn_inverse_frequencies(inv_freq, head_dim, theta, scaling)
    return inv_freq


def _yarn_inverse_frequencies(inv_freq: torch.Tensor, head_dim: int, theta: float,
                              scaling: RopeScaling) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): frequencies that turn more than ``beta_fast`` times over the
    original context are kept, those turning fewer than ``beta_slow`` times are divided by
    ``factor`` (interpolated), and the dimensions between are blended along a linear ramp."""

    def dimension_of(rotations: float) -> float:
        # the rotary dimension whose frequency turns `rotations` times over the original context
        wavelengths = scaling.original_max_position_embeddings / (rotations * 2 * math.pi)
        return head_dim * math.log(wavelengths) / (2 * math.log(theta))

    low, high = dimension_of(scaling.beta_fast), dimension_of(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    return inv_freq / scaling.factor * (1 - kept) + inv_freq * kept


def rope_attention_factor(scaling: RopeScaling) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature, 1 otherwise."""
    if scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling).float()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rope_attention_factor(scaling)
        # Tables are indexed by position each step; kept in the compute dtype on the device.
        self.register_buffer("cos", (emb.cos() * scale).to(device=device, dtype=dtype),
                             persistent=False)
        self.register_buffer("sin", (emb.sin() * scale).to(device=device, dtype=dtype),
                             persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``query`` [T, heads, d], ``key`` [T, kv_heads, d]; rotated by each token's position.

        Use the returned tensors: the native path rotates the inputs in place and returns them
        (their last dimension must be contiguous), the reference path returns new ones."""
        ops = usable(query)
        if (ops is not None and query.dtype == self.cos.dtype and query.stride(-1) == 1
                and key.stride(-1) == 1):
            ops.rotary_embedding(positions, query, key, self.cos, self.sin)
            return query, key
        return self.forward_reference(positions, query, key)

    def forward_reference(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
