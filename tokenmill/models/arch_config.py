"""The architecture numbers of a model, whatever file format they were read from.

Loaders fill this from GGUF metadata or a Hugging Face ``config.json``; models and the KV cache size
themselves from it. It knows nothing about files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.layers.rotary import RopeScaling
from tokenmill.models.moe_config import MoeConfig


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
    eos_token_ids: tuple[int, ...] = ()
    moe: MoeConfig | None = None  # Mixture-of-Experts models: Mixtral, Qwen2-MoE, Qwen3-MoE
    gguf_architecture: str | None = None
    """The ``general.architecture`` of a GGUF file (its tensors' layout depends on it); None for
    a Hugging Face folder."""
