"""The architecture numbers of a model, whatever file format they were read from.

Loaders fill this from GGUF metadata or a Hugging Face ``config.json``; models and the KV cache size
themselves from it. It knows nothing about files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.models.moe_config import MoeConfig


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


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # registry key: "llama", "mistral", "qwen2", "qwen3", "gemma", "mixtral",
    # "qwen2_moe", "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # Llama's attention_bias also puts one on o_proj (Qwen2 does not)
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head before rotary
    sliding_window: int | None = None  # Mistral
    hidden_act: str = "silu"  # the MLP's gate activation: "silu", or Gemma's "gelu_tanh"
    embedding_multiplier: float = 1.0  # Gemma scales the embeddings by sqrt(hidden_size)
    norm_weight_offset: float = 0.0
    """Added to every RMSNorm weight at load: Gemma's checkpoints store ``w`` for a ``1 + w``
    scale (its GGUF files hold ``1 + w`` already: llama.cpp's converter adds it)."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoeConfig | None = None  # Mixture-of-Experts models: Mixtral, Qwen2-MoE, Qwen3-MoE
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_bytes_per_token_per_layer_elements(self) -> int:
        """K and V elements one token occupies in one layer."""
        return 2 * self.num_key_value_heads * self.head_dim
