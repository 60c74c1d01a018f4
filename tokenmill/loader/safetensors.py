"""Hugging Face model folders: ``config.json`` + ``*.safetensors`` (memory-mapped) + tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import CorruptModelFileError, ModelNotFoundError, UnsupportedModelError
from tokenmill.layers.rotary import RopeScaling
from tokenmill.loader.moe_metadata import moe_from_hf_config
from tokenmill.models.arch_config import ArchConfig
from tokenmill.quant.checkpoint import checkpoint_format, wrap_checkpoint_tensors

# Hugging Face `architectures` entry -> tokenmill registry key.
SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",  # Qwen2 and Qwen2.5
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",  # Gemma 1 (Gemma 2 and 3 add soft-capping and more norms)
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


def read_hf_config(folder: Path) -> ArchConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json (not a Hugging Face model folder)")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptModelFileError(f"{config_file} is not valid JSON: {exc}") from exc
    names = config.get("architectures") or []
    known = [SUPPORTED_HF_ARCHITECTURES[n] for n in names if n in SUPPORTED_HF_ARCHITECTURES]
    if not known:
        raise UnsupportedModelError(
            f"{config_file}: architectures {names} are not supported; tokenmill runs "
            f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}"
        )
    # a quantization tokenmill cannot read fails here, before any memory goes to the model
    checkpoint_format(read_quantization_config(folder), config_file)
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or rope
        eos_ids = _eos_token_ids(folder, config)
        return ArchConfig(
            architecture=known[0],
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(scaling, config_file,
                                       int(config.get("max_position_embeddings", 2048))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=known[0] == "qwen2" or bool(config.get("attention_bias", False))
            or (known[0] == "qwen2_moe" and bool(config.get("qkv_bias", True))),
            o_proj_bias=known[0] != "qwen2" and bool(config.get("attention_bias", False)),
            qk_norm=known[0] in ("qwen3", "qwen3_moe"),
            sliding_window=_sliding_window(config, config_file),
            hidden_act=_hidden_act(config, config_file),
            embedding_multiplier=hidden ** 0.5 if known[0] == "gemma" else 1.0,
            norm_weight_offset=1.0 if known[0] == "gemma" else 0.0,
            eos_token_ids=eos_ids,
            moe=moe_from_hf_config(config, known[0], config_file),
        )
    except KeyError as exc:
        raise CorruptModelFileError(f"{config_file} lacks the field {exc.args[0]!r}") from exc


# Hugging Face activation names -> the MLP activations tokenmill has
_HIDDEN_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def _hidden_act(config: dict[str, Any], config_file: Path) -> str:
    # Gemma's config names it ``hidden_activation`` (its ``hidden_act`` is a legacy field)
    name = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if name not in _HIDDEN_ACTS:
        raise UnsupportedModelError(f"{config_file}: hidden activation {name!r} is not supported; "
                                    f"tokenmill runs {', '.join(_HIDDEN_ACTS)}")
    return _HIDDEN_ACTS[name]


def read_quantization_config(folder: Path) -> dict[str, Any] | None:
    """``quantization_config`` from config.json, else AutoGPTQ's / AutoAWQ's side file."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("quantization_config"):
        return config["quantization_config"]
    for side_file, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        if (folder / side_file).is_file():
            try:
                side = json.loads((folder / side_file).read_text())
            except json.JSONDecodeError as exc:
                raise CorruptModelFileError(f"{folder / side_file} is not valid JSON: "
                                            f"{exc}") from exc
            return {"quant_method": method, **side}
    return None


def _rope_scaling(scaling: dict[str, Any], config_file: Path,
                  max_position_embeddings: int) -> RopeScaling:
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return RopeScaling(
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    if kind == "yarn":
        if scaling.get("mscale") or scaling.get("mscale_all_dim"):
            raise UnsupportedModelError(f"{config_file}: yarn rope scaling with mscale "
                                        "(DeepSeek's variant) is not supported")
        attention_factor = scaling.get("attention_factor")
        return RopeScaling(
            rope_type="yarn",
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings") or max_position_embeddings),
            beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0),
            attention_factor=None if attention_factor is None else float(attention_factor),
            truncate=bool(scaling.get("truncate", True)),
        )
    raise UnsupportedModelError(f"{config_file}: rope scaling {kind!r} is not supported; tokenmill "
                                "runs default, linear, llama3 and yarn")


def _sliding_window(config: dict[str, Any], config_file: Path) -> int | None:
    """The window every layer attends within, None for full attention everywhere.

    transformers writes ``layer_types`` (one "full_attention" / "sliding_attention" per layer);
    Qwen2/Qwen3 declare a window but only use it when ``use_sliding_window`` is set, and then only
    from layer ``max_window_layers`` on. A model mixing both kinds of layer is refused: the KV
    cache and attention here take one window for the whole model."""
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types:
        kinds = set(layer_types)
        if kinds <= {"full_attention"}:
            return None
        if kinds == {"sliding_attention"} and window:
            return int(window)
        raise UnsupportedModelError(
            f"{config_file}: layer_types mixes {sorted(kinds)} (sliding_window={window}); "
            "tokenmill runs one attention window for all layers")
    # Qwen configs leave use_sliding_window out when it is off (transformers' default: False)
    qwen = config.get("model_type") in ("qwen2", "qwen3")
    if not config.get("use_sliding_window", not qwen) or not window:
        return None
    # an older Qwen2/Qwen3 config: layers from max_window_layers on slide, the ones before do not
    first_sliding = int(config.get("max_window_layers") or 0)
    if first_sliding >= int(config["num_hidden_layers"]):
        return None
    if first_sliding > 0:
        raise UnsupportedModelError(
            f"{config_file}: only layers from max_window_layers={first_sliding} on use the "
            f"sliding window ({window}); tokenmill runs one attention window for all layers")
    return int(window)


def _eos_token_ids(folder: Path, config: dict[str, Any]) -> tuple[int, ...]:
    """Every end token: config.json's ``eos_token_id`` (an id or a list), then any more that
    generation_config.json lists (Llama 3.x Instruct names <|end_of_text|>, <|eom_id|> and
    <|eot_id|> there). Generation stops on any of them."""
    ids: list[int] = []
    sources = [config.get("eos_token_id")]
    generation_file = folder / "generation_config.json"
    if generation_file.is_file():
        try:
            sources.append(json.loads(generation_file.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as exc:
            raise CorruptModelFileError(f"{generation_file} is not valid JSON: {exc}") from exc
    for value in sources:
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def iter_safetensors(folder: Path) -> Iterator[tuple[str, Any]]:
    """Every tensor of the folder; a quantized layer of a GPTQ/AWQ/FP8 checkpoint comes as one
    ``(<prefix>.weight, QuantizedWeight | Fp8Weight)`` entry (tokenmill.quant.checkpoint)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder} has no *.safetensors weight files")
    yield from wrap_checkpoint_tensors(_iter_files(files), read_quantization_config(folder), folder)


def _iter_files(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, handle.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as exc:
            # safetensors raises SafetensorError (a subclass of Exception) on bad headers
            raise CorruptModelFileError(f"{file} is not a readable safetensors file: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ == "SafetensorError":
                raise CorruptModelFileError(f"{file} is not a readable safetensors file: {exc}") from exc
            raise
