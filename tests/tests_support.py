"""Small builders shared by tests (no fixtures here, just functions)."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_folder(folder: Path) -> Path:
    """A randomly initialised 2-layer Llama saved by transformers (safetensors + config.json)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    from tokenmill.loader.model_source import load_tokenizer

    load_tokenizer(None).backend.save(str(folder / "tokenizer.json"))
    return folder
