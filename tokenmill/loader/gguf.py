"""GGUF loader: architecture numbers from the metadata, tensors dequantized with the ``gguf`` package.

Tensors are yielded under Hugging Face names (``model.layers.0.self_attn.q_proj.weight`` ...) so every
model maps one naming scheme to its parameters, whatever the file format. Three GGUF conventions are
undone here because they are facts of the format, not of the model:

* for the ``llama`` architecture only (Llama 1-3.x, and Mistral, which llama.cpp writes as llama),
  llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` (weights and biases) so its
  rotary kernel can rotate adjacent pairs; Hugging Face rotates the two halves of each head, so the
  permutation is inverted. ``qwen2`` / ``qwen3`` files are written unpermuted (llama.cpp rotates
  them in the halves ("NEOX") form) and are read as they are.
* Llama 3's rope scaling is not in the metadata but in a ``rope_freqs`` tensor of per-frequency
  divisors; it becomes ``RopeScaling(rope_type="freq_factors")``.
* a file without ``output.weight`` ties the LM head to ``token_embd``.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.errors import CorruptModelFileError, ModelNotFoundError, UnsupportedModelError
from tokenmill.layers.rotary import RopeScaling
from tokenmill.loader.moe_metadata import GGUF_MOE_ARCHITECTURES, moe_from_gguf
from tokenmill.models.arch_config import ArchConfig
from tokenmill.quant.gguf import KEPT_BLOCK_TYPES, block_weight
from tokenmill.quant.gguf_kquants import CONVERSION, CONVERTED_BLOCK_TYPES
from tokenmill.quant.weight import QuantizedWeight

logger = logging.getLogger(__name__)

# GGUF architecture name -> tokenmill registry key. Mistral files are written as "llama" (there
# is no "mistral" GGUF architecture; "mistral3" is another model and is refused).
# A "llama" file with {arch}.expert_count is a Mixtral (tokenmill key "mixtral").
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                                "gemma": "gemma", **GGUF_MOE_ARCHITECTURES}
# GGUF architectures whose attn_q / attn_k rows llama.cpp's converter permuted (LlamaModel's
# modify_tensors; Qwen2Model and Qwen3Model leave them as Hugging Face has them).
ROTARY_PERMUTED_GGUF_ARCHITECTURES = frozenset({"llama"})

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # Mixture of Experts: stacked experts [E, rows, cols], router, Qwen2-MoE's shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PATTERN = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: Path) -> Any:
    """Open a GGUF file (memory-mapped), turning every failure into an error naming the file."""
    import gguf

    if not path.is_file():
        raise ModelNotFoundError(f"model file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError, struct/numpy errors on bad bytes
        raise CorruptModelFileError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}"
        ) from exc


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor's bytes lie in the file: what a load needs of gguf's ``ReaderTensor``.

    Why not keep the ``ReaderTensor``s between reading the metadata and loading the weights: the
    reader builds them among its ~500k small metadata objects, so the few kept pinned ~50 MB of
    Python's object arenas that the freed metadata would otherwise have given back, resident for
    the life of the server. These records are made in one pass and hold no view of the mapping."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-moving dimension first
    offset: int  # of the data, from the start of the file
    dtype: np.dtype  # how gguf presents the data (float32/float16 values, or uint8 block bytes)
    data_shape: tuple[int, ...]

    def data(self, mapped: np.ndarray) -> np.ndarray:
        """The tensor's data as gguf's reader presents it, read from ``mapped`` (the file)."""
        num_bytes = int(np.prod(self.data_shape)) * self.dtype.itemsize
        return mapped[self.offset:self.offset + num_bytes].view(self.dtype).reshape(
            self.data_shape)


def tensor_entries(reader: Any) -> list[TensorEntry]:
    return [TensorEntry(str(t.name), t.tensor_type, tuple(int(n) for n in t.shape),
                        int(t.data_offset), t.data.dtype, tuple(t.data.shape))
            for t in reader.tensors]


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_arch_config(reader: Any, path: Path) -> ArchConfig:
    gguf_arch = field_value(reader, "general.architecture")
    if gguf_arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: architecture {gguf_arch!r} is not supported; tokenmill runs "
            f"{', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))}"
        )

    def arch_key(suffix: str, default: Any = None) -> Any:
        return field_value(reader, f"{gguf_arch}.{suffix}", default)

    def required(suffix: str) -> Any:
        value = arch_key(suffix)
        if value is None:
            raise CorruptModelFileError(f"{path}: metadata key {gguf_arch}.{suffix} is missing")
        return value

    hidden_size = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = arch_key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab_size is None:
        raise CorruptModelFileError(f"{path}: neither {gguf_arch}.vocab_size nor a vocabulary")
    names = {t.name for t in reader.tensors}
    has_output = "output.weight" in names
    window = arch_key("attention.sliding_window")
    intermediate_size = int(required("feed_forward_length"))
    moe = moe_from_gguf(arch_key, gguf_arch, intermediate_size, path)
    architecture = SUPPORTED_GGUF_ARCHITECTURES[gguf_arch]
    return ArchConfig(
        architecture="mixtral" if moe is not None and architecture == "llama" else architecture,
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=int(required("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(arch_key("attention.head_count_kv", num_heads)),
        head_dim=int(arch_key("attention.key_length", hidden_size // num_heads)),
        max_position_embeddings=int(arch_key("context_length", 2048)),
        rms_norm_eps=float(arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(arch_key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(arch_key, reader, path),
        tie_word_embeddings=not has_output,
        attention_bias=gguf_arch == "qwen2" or "blk.0.attn_q.bias" in names,
        o_proj_bias="blk.0.attn_output.bias" in names,
        qk_norm=gguf_arch in ("qwen3", "qwen3moe"),
        sliding_window=int(window) if window else None,
        # Gemma: GELU MLP and scaled embeddings; its norm weights are stored as 1 + w already
        hidden_act="gelu_tanh" if gguf_arch == "gemma" else "silu",
        embedding_multiplier=hidden_size ** 0.5 if gguf_arch == "gemma" else 1.0,
        eos_token_ids=gguf_eos_token_ids(reader),
        gguf_architecture=gguf_arch,
        moe=moe,
    )


def gguf_eos_token_ids(reader: Any) -> tuple[int, ...]:
    """The end-of-sequence id, then the end-of-turn and end-of-message ids when the file names
    them (Llama 3.x: <|end_of_text|>, <|eot_id|>, <|eom_id|>): generation stops on any of them."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = field_value(reader, key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def _rope_scaling(arch_key: Any, reader: Any, path: Path) -> RopeScaling:
    kind = arch_key("rope.scaling.type")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if kind not in (None, "none"):
            raise UnsupportedModelError(f"{path}: rope scaling {kind!r} together with a "
                                        "rope_freqs tensor is not supported")
        factors = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        return RopeScaling(rope_type="freq_factors",
                           freq_factors=tuple(float(f) for f in factors))
    if kind in (None, "none"):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(arch_key("rope.scaling.factor", 1.0)))
    if kind == "yarn":
        original = arch_key("rope.scaling.original_context_length") or arch_key("context_length")
        return RopeScaling(rope_type="yarn", factor=float(arch_key("rope.scaling.factor", 1.0)),
                           original_max_position_embeddings=int(original))
    raise UnsupportedModelError(f"{path}: rope scaling {kind!r} in GGUF metadata is not "
                                "supported; tokenmill runs none, linear, yarn and rope_freqs "
                                "factors")


def iter_gguf_tensors(tensors: list[TensorEntry], arch: ArchConfig, path: Path
                      ) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Yield ``(hf_name, tensor)`` for every tensor, un-permuted: matrices of ``KEPT_BLOCK_TYPES``
    as ``QuantizedWeight`` (Q8_0/Q4_0/Q4_1 bit for bit, Q5/K-quants converted as
    ``gguf_kquants`` says), everything else dequantized to float32.
    The file is mapped for the load only: its pages are not resident once the load is done."""
    from gguf.quants import dequantize

    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as exc:
        raise ModelNotFoundError(f"model file {path} cannot be read: {exc}") from exc
    dequantized_types: set[str] = set()
    dequantized_expert_types: set[str] = set()
    converted_types: set[str] = set()
    permuted = arch.gguf_architecture in ROTARY_PERMUTED_GGUF_ARCHITECTURES
    while tensors:
        tensor = tensors.pop(0)
        name = _hf_name(tensor.name, path)
        if name is None:
            continue  # e.g. rope_freqs: read with the metadata (read_arch_config)
        type_name = tensor.tensor_type.name
        if type_name in KEPT_BLOCK_TYPES and len(tensor.shape) in (2, 3):
            if len(tensor.shape) == 2:
                weight = _native_weight(tensor, mapped, name, arch, path, permuted)
                kept = None if weight is None else [(name, weight)]
            else:
                kept = _native_experts(tensor, mapped, name, path)
            if kept is not None:  # None: a scale beyond float16, dequantized below
                if type_name in CONVERTED_BLOCK_TYPES:
                    converted_types.add(type_name)
                yield from kept
                continue
        if type_name not in ("F32", "F16", "BF16"):
            # stacked expert tensors [E, rows, cols] are dequantized whatever their type
            (dequantized_expert_types if len(tensor.shape) == 3 else dequantized_types).add(
                type_name)
        try:
            array = dequantize(tensor.data(mapped), tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot "
                f"be dequantized: {exc}"
            ) from exc
        except (ValueError, IndexError) as exc:
            raise CorruptModelFileError(f"{path}: tensor {tensor.name} is unreadable: {exc}") from exc
        # F32 tensors come back as read-only views of the memory map; torch needs its own copy.
        array = np.array(array, dtype=np.float32, copy=True)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute_rotary(array, arch.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _unpermute_rotary(array, arch.num_key_value_heads)
        yield name, torch.from_numpy(array)
    if converted_types:
        logger.info("%s: %s", path.name, "; ".join(
            f"{kind} kept {CONVERSION[kind]}" for kind in sorted(converted_types)))
    if dequantized_types:
        logger.info("%s: tensors of type %s are dequantized at load (tokenmill keeps %s in "
                    "quantized form)", path.name, ", ".join(sorted(dequantized_types)),
                    ", ".join(KEPT_BLOCK_TYPES))
    if dequantized_expert_types:
        logger.info("%s: expert tensors (ffn_*_exps) of type %s are dequantized at load to the "
                    "model's dtype (tokenmill keeps %s expert blocks in quantized form)",
                    path.name, ", ".join(sorted(dequantized_expert_types)),
                    ", ".join(KEPT_BLOCK_TYPES))


def _native_weight(tensor: TensorEntry, mapped: np.ndarray, name: str, arch: ArchConfig,
                   path: Path, permuted: bool) -> QuantizedWeight | None:
    cols, rows = (int(n) for n in tensor.shape)  # GGUF lists the fastest-moving dimension first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the read-only memory map
            weight = block_weight(tensor.tensor_type.name, tensor.data(mapped), rows, cols)
    except (ValueError, RuntimeError) as exc:
        raise CorruptModelFileError(f"{path}: tensor {tensor.name} is unreadable: {exc}") from exc
    if weight is None:
        return None
    if permuted and name.endswith("q_proj.weight"):
        weight = weight.select_rows(_unpermute_rows(rows, arch.num_attention_heads))
    elif permuted and name.endswith("k_proj.weight"):
        weight = weight.select_rows(_unpermute_rows(rows, arch.num_key_value_heads))
    return weight


def _native_experts(tensor: TensorEntry, mapped: np.ndarray, name: str, path: Path
                    ) -> list[tuple[str, QuantizedWeight]] | None:
    """A stacked ``ffn_*_exps`` tensor of a kept block type, as one ``QuantizedWeight`` per expert
    under per-expert names (``...mlp.experts.gate_proj.weight`` -> ``...mlp.experts.3.gate_proj.weight``);
    None when one expert's blocks cannot be kept (the whole tensor is then dequantized)."""
    cols, rows, num_experts = (int(n) for n in tensor.shape)
    data = tensor.data(mapped)
    prefix, _, projection = name.removesuffix(".weight").rpartition(".")
    experts = []
    for expert in range(num_experts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about the read-only memory map
                weight = block_weight(tensor.tensor_type.name, data[expert], rows, cols)
        except (ValueError, RuntimeError, IndexError) as exc:
            raise CorruptModelFileError(f"{path}: tensor {tensor.name} is unreadable: "
                                        f"{exc}") from exc
        if weight is None:
            return None
        experts.append((f"{prefix}.{expert}.{projection}.weight", weight))
    return experts


def _unpermute_rows(rows: int, num_heads: int) -> torch.Tensor:
    """The row order ``_unpermute_rotary`` produces, as indices: a gather, so blocks stay intact."""
    order = _unpermute_rotary(np.arange(rows), num_heads)
    return torch.from_numpy(np.ascontiguousarray(order))


def _hf_name(gguf_name: str, path: Path) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.match(gguf_name)
    if match is None:
        return None
    layer, short, kind = match.groups()
    if short not in _LAYER_NAMES:
        raise UnsupportedModelError(f"{path}: tensor {gguf_name} is not part of a supported model")
    return f"model.layers.{layer}.{_LAYER_NAMES[short]}.{kind}"


def _unpermute_rotary(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's ``reshape(h, 2, d/2, ...).swapaxes(1, 2)`` row permutation."""
    rows = array.shape[0]
    rest = array.shape[1:]
    head_dim = rows // num_heads
    return (
        array.reshape(num_heads, head_dim // 2, 2, *rest)
        .swapaxes(1, 2)
        .reshape(rows, *rest)
    )
