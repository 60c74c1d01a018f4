"""The Mixture-of-Experts numbers of a model (``ArchConfig.moe``), whatever file they were read from.

Mixtral, Qwen2-MoE and Qwen3-MoE differ only in these: how many experts, how many each token uses,
whether the chosen top-k probabilities are renormalized to sum to one, whether a shared expert (with
its sigmoid gate) runs beside the routed ones, and which layers are sparse at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.errors import CorruptModelFileError


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    """Routed experts per sparse layer (HF ``num_local_experts``/``num_experts``, GGUF
    ``expert_count``)."""
    num_experts_per_tok: int
    """Experts each token is sent to, the top-k (GGUF ``expert_used_count``)."""
    moe_intermediate_size: int
    """Hidden size of one routed expert's SwiGLU MLP."""
    norm_topk_prob: bool
    """Renormalize the top-k softmax probabilities to sum to 1 (Mixtral and Qwen3-MoE do; Qwen2-MoE
    does not)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE's always-on expert, scaled by ``sigmoid(shared_expert_gate(x))``; 0: none."""
    dense_layers: tuple[int, ...] = ()
    """Layers that keep a dense MLP of ``ArchConfig.intermediate_size`` (Qwen's
    ``mlp_only_layers`` and ``decoder_sparse_step``)."""

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    def is_sparse(self, layer_index: int) -> bool:
        return layer_index not in self.dense_layers


def check_expert_counts(num_experts: int, num_experts_per_tok: int, where: str,
                        experts_key: str, used_key: str) -> None:
    """Raise, naming the keys and values, unless ``0 < top-k <= experts``."""
    if num_experts <= 0:
        raise CorruptModelFileError(f"{where}: {experts_key}={num_experts}; an MoE model needs "
                                    "at least one expert")
    if not 0 < num_experts_per_tok <= num_experts:
        raise CorruptModelFileError(
            f"{where}: {used_key}={num_experts_per_tok} must be between 1 and "
            f"{experts_key}={num_experts}")
