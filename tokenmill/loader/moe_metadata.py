"""``MoeConfig`` from a Hugging Face ``config.json`` or from GGUF metadata.

Routing follows each family's own definition: transformers' ``norm_topk_prob`` (Mixtral always
renormalizes and has no such field); in GGUF, ``{arch}.expert_weights_norm`` when the file has it,
otherwise what llama.cpp hard-codes per architecture (llama/Mixtral and qwen3moe renormalize,
qwen2moe does not). llama.cpp makes every layer of a qwen2moe/qwen3moe file sparse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.errors import CorruptModelFileError
from tokenmill.models.moe_config import MoeConfig, check_expert_counts

HF_MOE_ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe")
GGUF_MOE_ARCHITECTURES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
"""GGUF names of MoE-only architectures; a ``llama`` file with ``expert_count`` is a Mixtral."""


def moe_from_hf_config(config: dict[str, Any], architecture: str,
                       config_file: Path) -> MoeConfig | None:
    if architecture not in HF_MOE_ARCHITECTURES:
        return None
    experts_key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    num_experts = int(config.get(experts_key) or 0)
    top_k = int(config.get("num_experts_per_tok") or 0)
    check_expert_counts(num_experts, top_k, str(config_file), experts_key, "num_experts_per_tok")
    num_layers = int(config["num_hidden_layers"])
    if architecture == "mixtral":  # every layer sparse, experts of intermediate_size, renormalized
        return MoeConfig(num_experts, top_k, int(config["intermediate_size"]), True)
    step = int(config.get("decoder_sparse_step") or 1)
    only_mlp = set(config.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step)
    shared = (int(config.get("shared_expert_intermediate_size") or 0)
              if architecture == "qwen2_moe" else 0)
    return MoeConfig(num_experts, top_k, int(config["moe_intermediate_size"]),
                     bool(config.get("norm_topk_prob", False)), shared, dense)


def moe_from_gguf(arch_key: Callable[..., Any], gguf_arch: str, intermediate_size: int,
                  path: Path) -> MoeConfig | None:
    """``arch_key(suffix, default)`` reads ``{gguf_arch}.{suffix}``."""
    num_experts = arch_key("expert_count")
    if not num_experts:
        if gguf_arch in GGUF_MOE_ARCHITECTURES:
            raise CorruptModelFileError(f"{path}: metadata key {gguf_arch}.expert_count is "
                                        "missing (a Mixture-of-Experts architecture)")
        return None
    top_k = arch_key("expert_used_count")
    if top_k is None:
        raise CorruptModelFileError(f"{path}: metadata key {gguf_arch}.expert_used_count is "
                                    "missing")
    num_experts, top_k = int(num_experts), int(top_k)
    check_expert_counts(num_experts, top_k, str(path), f"{gguf_arch}.expert_count",
                        f"{gguf_arch}.expert_used_count")
    qwen = gguf_arch in GGUF_MOE_ARCHITECTURES
    # llama.cpp's fallbacks when the expert sizes are not written
    expert_size = int(arch_key("expert_feed_forward_length")
                      or (intermediate_size // top_k if qwen else intermediate_size))
    shared_size = (int(arch_key("expert_shared_feed_forward_length") or intermediate_size)
                   if gguf_arch == "qwen2moe" else 0)
    renormalize = arch_key("expert_weights_norm")
    if renormalize is None:
        renormalize = gguf_arch != "qwen2moe"
    return MoeConfig(num_experts, top_k, expert_size, bool(renormalize), shared_size)
