"""Randomly initialised Llama / Mistral / Qwen2 models saved by transformers load through tokenmill's
safetensors loader and give transformers' logits."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.attention import causal_metadata
from tokenmill.loader.model_source import open_model_source
from tokenmill.models.registry import build_model

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "vocab_size": 49152}


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=False),
        "llama3-rope-scaling": LlamaConfig(
            **COMMON, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "llama-linear-rope": LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear",
                                                                 "factor": 2.0}),
        # a window shorter than the prompt, so the sliding-window mask is exercised
        "mistral": MistralConfig(**COMMON, sliding_window=8),
        "qwen2": Qwen2Config(**COMMON, tie_word_embeddings=True),
    }


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, hf_builtin_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    models = {}
    for name, config in _configs().items():
        folder = tmp_path_factory.mktemp(name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        if name == "qwen2":  # random-init biases are zero; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.data.normal_(0, 0.5)
        model.save_pretrained(folder)
        hf_builtin_tokenizer.save_pretrained(folder)
        models[name] = (folder, model)
    return models


@pytest.mark.parametrize("name", list(_configs()))
def test_tiny_model_logits_match_transformers(name, saved_models):
    folder, reference = saved_models[name]
    source = open_model_source(folder)
    model = build_model(source, torch.float32, "cpu")
    ids = source.tokenizer.encode("A short prompt, long enough to pass a sliding window of 8.")
    assert len(ids) > 8
    if name == "mistral":
        assert source.arch.sliding_window == 8
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                          causal_metadata([len(ids)], source.arch.sliding_window)))
        expected = reference(torch.tensor([ids])).logits[0]
    assert (ours - expected).abs().max().item() < 1e-4


def test_safetensors_folder_tokenizer_and_template(saved_models, hf_builtin_tokenizer):
    folder, _ = saved_models["llama"]
    tokenizer = open_model_source(folder).tokenizer
    text = "Tokenizer from tokenizer.json 🎉"
    assert tokenizer.encode(text) == hf_builtin_tokenizer.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == hf_builtin_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
