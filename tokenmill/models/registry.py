"""Architecture name -> model class, and the one function that builds a loaded model."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.errors import UnsupportedModelError
from tokenmill.loader.model_source import ModelSource
from tokenmill.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device | str,
                max_positions: int | None = None) -> nn.Module:
    model_class = MODEL_REGISTRY.get(source.arch.architecture)
    if model_class is None:
        raise UnsupportedModelError(f"{source.path}: no model for architecture "
                                    f"{source.arch.architecture!r}")
    model = model_class(source.arch, dtype=dtype, device=device, max_positions=max_positions)
    with torch.inference_mode():
        model.load_weights(source.iter_tensors())
    return model.eval()
