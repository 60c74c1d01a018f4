"""A model's architecture numbers and the arithmetic the planner needs from them.

The planner never loads weights: parameter counts, KV bytes per token and bytes read per decode step
all follow from a dozen integers. Those come from the catalog, a GGUF file's metadata (read with
``gguf.GGUFReader``, which maps the file and reads only the header) or an HF ``config.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.errors import BenchError

# Bytes per stored weight. int4 carries one fp16 scale per group of 32 (as GGUF Q4_0 and most
# GPTQ/AWQ setups do), which is why it is 0.5625 rather than 0.5.
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 2 / 32,
}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def normalize_dtype(name: str, *, what: str = "dtype") -> str:
    key = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BYTES_PER_PARAM:
        raise BenchError(f"{what}={name!r} is not known; choose one of "
                         f"{', '.join(BYTES_PER_PARAM)}")
    return key


@dataclass(frozen=True)
class ModelArch:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 1
    num_experts_per_token: int = 1
    qkv_bias: bool = False
    max_context: int | None = None
    source: str = ""
    # Exact bytes of the weights as stored in a file (GGUF/safetensors); used when the user plans
    # the file as it is rather than re-quantized to a named dtype.
    file_weight_bytes: int | None = None
    file_dtype: str | None = None

    # -- parameter counts ---------------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        return q + kv + o + bias

    @property
    def expert_params(self) -> int:
        """One SwiGLU MLP (gate, up, down); a dense model has exactly one of these per layer."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def router_params_per_layer(self) -> int:
        return self.hidden_size * self.num_experts if self.is_moe else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        per_layer = (self.attention_params_per_layer + self.num_experts * self.expert_params
                     + self.router_params_per_layer + 2 * self.hidden_size)
        heads = self.embedding_params * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + heads + self.hidden_size

    @property
    def num_active_params(self) -> int:
        """Parameters one token multiplies through (2 FLOPs each): top-k experts and the LM head."""
        per_layer = (self.attention_params_per_layer
                     + self.num_experts_per_token * self.expert_params
                     + self.router_params_per_layer)
        return self.num_layers * per_layer + self.embedding_params

    # -- bytes ----------------------------------------------------------------------------------
    def weight_bytes(self, dtype: str | None) -> float:
        """All weights in ``dtype``; ``None`` means as stored in the model file."""
        if dtype is None:
            if self.file_weight_bytes is None:
                raise BenchError(f"model {self.name!r} has no file to take weight sizes from; "
                                 "pass --dtype")
            return float(self.file_weight_bytes)
        return self.num_params * BYTES_PER_PARAM[dtype]

    def bytes_per_param(self, dtype: str | None) -> float:
        return self.weight_bytes(dtype) / self.num_params

    def kv_bytes_per_token(self, kv_dtype: str) -> float:
        """K and V for every layer: 2 × layers × kv_heads × head_dim × bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * BYTES_PER_PARAM[kv_dtype]

    def decode_weight_bytes_read(self, dtype: str | None, batch_size: int) -> float:
        """Weight bytes one decode step reads for ``batch_size`` sequences.

        The input embedding is a row lookup, so an untied table is not streamed. For MoE, a batch
        of B tokens routes to an expected ``E · (1 - (1 - k/E)^B)`` distinct experts (uniform
        routing), which is why MoE decode gets dearer per step as the batch grows.
        """
        per_param = self.bytes_per_param(dtype)
        skipped = 0 if self.tie_word_embeddings else self.embedding_params
        if self.is_moe:
            touched = self.num_experts * (
                1 - (1 - self.num_experts_per_token / self.num_experts) ** max(batch_size, 1))
            skipped += self.num_layers * (self.num_experts - touched) * self.expert_params
        return (self.num_params - skipped) * per_param

    def attention_flops_per_token(self, context_len: int) -> float:
        """QKᵀ and PV for one new token attending to ``context_len`` earlier ones."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * context_len


# -- reading architecture numbers from files ----------------------------------------------------
def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv on some models)
        return max(value) if value else None
    return value


def arch_from_gguf(path: Path) -> ModelArch:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/... on a bad header
        raise BenchError(f"cannot read GGUF metadata from {path}: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if not arch:
        raise BenchError(f"{path} has no general.architecture field; is it a GGUF model file?")

    def need(suffix: str) -> int:
        value = _field(reader, f"{arch}.{suffix}")
        if value is None:
            raise BenchError(f"{path} lacks GGUF field {arch}.{suffix}; cannot plan this model")
        return int(value)

    hidden = need("embedding_length")
    num_heads = need("attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise BenchError(f"{path} records no vocabulary size")
    tensor_names = {t.name for t in reader.tensors}
    file_type = _field(reader, "general.file_type")
    return ModelArch(
        name=str(_field(reader, "general.name") or path.stem),
        num_layers=need("block_count"),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv") or num_heads),
        head_dim=int(_field(reader, f"{arch}.attention.key_length") or hidden // num_heads),
        intermediate_size=need("feed_forward_length"),
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in tensor_names,
        num_experts=int(_field(reader, f"{arch}.expert_count") or 1),
        num_experts_per_token=int(_field(reader, f"{arch}.expert_used_count") or 1),
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        max_context=_field(reader, f"{arch}.context_length"),
        source=f"GGUF metadata of {path}",
        file_weight_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        file_dtype=f"gguf file_type {file_type}" if file_type is not None else "gguf",
    )


def arch_from_hf_folder(folder: Path) -> ModelArch:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BenchError(f"{folder} has no config.json; pass a GGUF file, an HF model folder or "
                         "a catalog name")
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read {config_path}: {exc}") from exc
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's numbers
    try:
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        arch = ModelArch(
            name=folder.name,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
            num_experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            max_context=cfg.get("max_position_embeddings"),
            source=f"config.json of {folder}",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"{config_path} lacks a usable field: {exc}") from exc
    shard_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if shard_bytes:
        arch = replace(arch, file_weight_bytes=shard_bytes, file_dtype="safetensors")
    return arch


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def is_power_of_two(n: int) -> bool:
    return n > 0 and math.log2(n).is_integer()
