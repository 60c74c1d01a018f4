"""Architecture name -> model class, and the one function that builds a loaded model."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.errors import UnsupportedModelError
from tokenmill.loader.model_source import ModelSource
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.moe import MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,  # the Llama model with per-head q/k RMSNorm (ArchConfig.qk_norm)
    "gemma": LlamaForCausalLM,  # GELU MLP, scaled embeddings, 1 + w norms (ArchConfig fields)
    "mixtral": MoeForCausalLM,
    "qwen2_moe": MoeForCausalLM,
    "qwen3_moe": MoeForCausalLM,
}


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device | str,
                max_positions: int | None = None, quantization: str = "auto",
                quantization_group_size: int = 32, parallel: ParallelContext | None = None
                ) -> nn.Module:
    """The model for ``source`` with its weights loaded; ``quantization`` names the method that
    prepares each linear layer (tokenmill.quant.registry). With a ``parallel`` context of N ranks
    the model holds this rank's shard of every layer (tokenmill.distributed)."""
    from tokenmill.quant.registry import get_quant_method

    method = get_quant_method(quantization, quantization_group_size)
    model_class = MODEL_REGISTRY.get(source.arch.architecture)
    if model_class is None:
        raise UnsupportedModelError(f"{source.path}: no model for architecture "
                                    f"{source.arch.architecture!r}")
    extra = {} if parallel is None else {"parallel": parallel}
    model = model_class(source.arch, dtype=dtype, device=device, max_positions=max_positions,
                        **extra)
    with torch.inference_mode():
        model.load_weights(source.iter_tensors(), method)
    return model.eval()
