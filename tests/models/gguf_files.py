"""Write a GGUF file from a Hugging Face model the way llama.cpp's ``convert_hf_to_gguf.py`` does,
for tests: same tensor names, same metadata keys, and the q/k row permutation only where the
converter applies it (its LlamaModel, which also takes Mistral; Qwen2Model and Qwen3Model write the
rows unpermuted). Llama 3 rope scaling goes into a ``rope_freqs`` tensor of per-frequency divisors,
computed here from transformers' own llama3 rope, not from tokenmill's.

The vocabulary is the built-in model's (SmolLM2, byte-level BPE, 49152 tokens), copied from its GGUF
metadata, so tiny models need ``vocab_size=49152``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# HF model architecture -> GGUF architecture llama.cpp's converter writes
GGUF_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                     "gemma": "gemma"}
PERMUTED = {"llama"}

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation: each head's two rotary halves interleaved into adjacent pairs."""
    shape = weights.shape
    return (weights.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def gguf_name(hf_name: str) -> str | None:
    local = hf_name.removeprefix("model.")
    if local == "embed_tokens.weight":
        return "token_embd.weight"
    if local == "norm.weight":
        return "output_norm.weight"
    if local == "lm_head.weight":
        return "output.weight"
    _, index, rest = local.split(".", 2)  # layers.N.<module>.<kind>
    module, _, kind = rest.rpartition(".")
    return f"blk.{index}.{_LAYER_NAMES[module]}.{kind}"


def llama3_freq_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors = default inverse frequencies / transformers' llama3 ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    default = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (default / scaled.float()).numpy().astype(np.float32)


def write_gguf(model: Any, path: Path, tokenizer_reader: Any, *, qtype: str = "F32",
               eot_token_id: int | None = None, rope_scaling_type: str | None = None,
               encode: Callable[[str, np.ndarray], tuple[np.ndarray, str] | None] | None = None
               ) -> Path:
    """``model`` (a transformers causal LM) as a GGUF file; 2-D matrices as ``qtype`` (F32 or
    Q8_0), norms and biases F32, as the converter writes them. ``rope_scaling_type`` writes that
    ``rope.scaling.type`` instead of the model's (for files tokenmill must refuse). ``encode``,
    when given, is asked first for every 2-D matrix (GGUF name, float rows as the file holds them)
    and may return ``(raw block bytes, type name)`` to store instead."""
    import gguf

    config = model.config
    model_type = config.model_type
    arch = GGUF_ARCHITECTURE[model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    num_heads = config.num_attention_heads
    num_kv_heads = config.num_key_value_heads or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    rope = config.rope_parameters
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_freq_factors(config))
    elif rope.get("rope_type") not in (None, "default"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope["rope_type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if rope_scaling_type is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling_type))
    _copy_tokenizer(tokenizer_reader, writer)
    if eot_token_id is not None:
        writer.add_eot_token_id(eot_token_id)

    quant_type = gguf.GGMLQuantizationType[qtype]
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        array = tensor.detach().float().numpy().copy()
        if arch in PERMUTED and ".q_proj." in name:
            array = permute_rows(array, num_heads)
        elif arch in PERMUTED and ".k_proj." in name:
            array = permute_rows(array, num_kv_heads)
        if arch == "gemma" and name.endswith("norm.weight"):
            array = array + 1  # llama.cpp's converter stores Gemma's 1 + w scale
        target = gguf_name(name)
        encoded = encode(target, array) if encode is not None and array.ndim == 2 else None
        if encoded is not None:
            raw, type_name = encoded
            writer.add_tensor(target, raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
        elif array.ndim == 2 and quant_type != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, gguf.quants.quantize(array, quant_type),
                              raw_dtype=quant_type)
        else:
            writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _copy_tokenizer(reader: Any, writer: Any) -> None:
    from tokenmill.loader.gguf import field_value

    writer.add_tokenizer_model(field_value(reader, "tokenizer.ggml.model"))
    writer.add_token_list(field_value(reader, "tokenizer.ggml.tokens"))
    writer.add_token_merges(field_value(reader, "tokenizer.ggml.merges"))
    writer.add_token_types(field_value(reader, "tokenizer.ggml.token_type"))
    writer.add_bos_token_id(field_value(reader, "tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(field_value(reader, "tokenizer.ggml.eos_token_id"))
    template = field_value(reader, "tokenizer.chat_template")
    if template:
        writer.add_chat_template(template)
