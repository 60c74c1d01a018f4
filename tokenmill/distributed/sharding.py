"""How a Llama-family model is cut across ``world_size`` ranks, and how one weight is cut.

* Attention: query heads split evenly (rank r holds heads ``[r*H/N, (r+1)*H/N)``). KV heads split
  evenly when there are at least N of them; when fewer, each is replicated on ``N / KV`` ranks, and
  rank r holds the one KV head its query heads read (``r * KV // N``).
* MLP: gate/up split by output rows, down_proj by input columns (the intermediate dimension).
* Vocabulary: the embedding and LM head split by vocabulary rows, ``ceil(V / N)`` per rank.

Cutting a weight: a column-parallel layer keeps a range of output rows, which is always whole
quantization blocks (blocks run along the inputs). A row-parallel layer keeps a range of input
columns, which must be a whole number of quantization groups (GGUF blocks of 32, int4 groups): the
slice moves the codes and their scales together, bit for bit, never requantizing. Slices are
copies, so the full tensor the loader produced is freed as soon as the next one arrives: a rank
holds its shards plus, for a moment, one full tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.errors import ConfigError, UnsupportedModelError
from tokenmill.quant.weight import QuantizedWeight

if TYPE_CHECKING:
    from tokenmill.models.arch_config import ArchConfig

TP_PARAM = "tensor_parallel_size"


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (1 when replicated)
    head_start: int  # first query head
    kv_head_start: int  # first KV head


def check_model_split(arch: ArchConfig, world_size: int) -> None:
    """Raise ``ConfigError`` naming ``tensor_parallel_size`` when ``arch`` cannot be cut into
    ``world_size`` shards: heads, KV heads, and every MLP's intermediate size (an MoE's experts
    and shared expert included). Called before any worker starts, and by the model itself."""
    check_tensor_parallel(arch.num_attention_heads, arch.num_key_value_heads,
                          arch.intermediate_size, world_size)
    if arch.moe is not None:
        check_divides(arch.moe.moe_intermediate_size, "expert intermediate size", world_size)
        check_divides(arch.moe.shared_expert_intermediate_size,
                      "shared expert intermediate size", world_size)


def check_tensor_parallel(num_heads: int, num_kv_heads: int, intermediate_size: int,
                          world_size: int) -> None:
    """Raise ``ConfigError`` naming ``tensor_parallel_size`` when the model cannot be cut so."""
    if world_size < 1:
        raise ConfigError(f"{TP_PARAM}={world_size} must be at least 1", param=TP_PARAM)
    if num_heads % world_size:
        raise ConfigError(f"{TP_PARAM}={world_size} does not divide the model's {num_heads} "
                          f"attention heads; use a divisor of {num_heads}", param=TP_PARAM)
    if num_kv_heads >= world_size and num_kv_heads % world_size:
        raise ConfigError(f"{TP_PARAM}={world_size} does not divide the model's {num_kv_heads} "
                          f"KV heads; use a divisor of {num_kv_heads}", param=TP_PARAM)
    if num_kv_heads < world_size and world_size % num_kv_heads:
        raise ConfigError(f"{TP_PARAM}={world_size} is not a multiple of the model's "
                          f"{num_kv_heads} KV heads (each KV head is replicated on "
                          f"{TP_PARAM} / KV heads ranks)", param=TP_PARAM)
    check_divides(intermediate_size, "intermediate size", world_size)


def check_divides(size: int, what: str, world_size: int) -> None:
    """Raise ``ConfigError`` unless ``world_size`` ranks split ``size`` evenly."""
    if size % world_size:
        raise ConfigError(f"{TP_PARAM}={world_size} does not divide the model's {what} {size}",
                          param=TP_PARAM)


def head_shard(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    heads = num_heads // world_size
    if num_kv_heads >= world_size:
        kv_heads = num_kv_heads // world_size
        return HeadShard(heads, kv_heads, rank * heads, rank * kv_heads)
    return HeadShard(heads, 1, rank * heads, rank * num_kv_heads // world_size)


def num_kv_heads_per_rank(num_kv_heads: int, world_size: int) -> int:
    """KV heads one rank caches: the KV cache of a rank is sized with this."""
    return max(1, num_kv_heads // world_size)


def even_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, length)`` of rank's part when ``size`` splits evenly (checked beforehand)."""
    length = size // world_size
    return rank * length, length


def vocab_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """``(start, length, padded_length)``: ``padded_length = ceil(V / N)`` rows per rank; the last
    rank's real rows may be fewer (its logits are padded for the all-gather, then cut)."""
    per_rank = -(-vocab_size // world_size)
    start = min(rank * per_rank, vocab_size)
    return start, min(per_rank, vocab_size - start), per_rank


def slice_rows(weight: Any, start: int, length: int) -> Any:
    """Output rows ``[start, start + length)`` of a weight in any form, as its own copy."""
    if isinstance(weight, torch.Tensor):
        return weight[start:start + length].clone()
    if isinstance(weight, QuantizedWeight):
        rows = slice(start, start + length)
        return QuantizedWeight(weight.bits, weight.group_size, weight.qweight[rows].clone(),
                               weight.scales[rows].clone(),
                               None if weight.mins is None else weight.mins[rows].clone(),
                               weight.input_perm, weight.source)
    if type(weight).__name__ == "Fp8Weight":
        return _fp8_rows(weight, start, length)
    raise UnsupportedModelError(f"cannot shard a weight of type {type(weight).__name__}")


def slice_cols(weight: Any, start: int, length: int, name: str) -> Any:
    """Input columns ``[start, start + length)``: whole quantization groups only."""
    if isinstance(weight, torch.Tensor):
        return _own(weight[:, start:start + length])
    if isinstance(weight, QuantizedWeight):
        group = weight.group_size
        if start % group or length % group:
            raise UnsupportedModelError(
                f"{name}: a tensor-parallel shard of {length} inputs (from input {start}) is not "
                f"a whole number of its {group}-input quantization groups ({weight.source}); "
                f"choose a {TP_PARAM} that keeps whole groups")
        if weight.input_perm is not None:
            raise UnsupportedModelError(
                f"{name}: GPTQ act-order (desc_act) weights cannot be split by input columns; "
                f"use {TP_PARAM}=1 or --quantization none")
        per_byte = 2 if weight.bits == 4 else 1
        cols = slice(start // per_byte, (start + length) // per_byte)
        groups = slice(start // group, (start + length) // group)
        mins = None if weight.mins is None else _own(weight.mins[:, groups])
        return QuantizedWeight(weight.bits, group, _own(weight.qweight[:, cols]),
                               _own(weight.scales[:, groups]), mins,
                               None, weight.source)
    if type(weight).__name__ == "Fp8Weight":
        return _fp8_cols(weight, start, length, name)
    raise UnsupportedModelError(f"{name}: cannot shard a weight of type {type(weight).__name__}")


def _fp8_rows(weight: Any, start: int, length: int) -> Any:
    from tokenmill.quant.fp8 import Fp8Weight

    scale = weight.scale
    if weight.block_size is not None:
        block_rows = weight.block_size[0]
        if start % block_rows:
            raise UnsupportedModelError(f"an FP8 shard from row {start} splits a {block_rows}-row "
                                        "scale block")
        scale = scale[start // block_rows: -(-(start + length) // block_rows)]
    elif scale.dim() == 1:
        scale = scale[start:start + length]
    return Fp8Weight(weight.codes[start:start + length].clone(), scale.clone(),
                     weight.block_size, weight.source)


def _fp8_cols(weight: Any, start: int, length: int, name: str) -> Any:
    from tokenmill.quant.fp8 import Fp8Weight

    scale = weight.scale
    if weight.block_size is not None:
        block_cols = weight.block_size[1]
        if start % block_cols:
            raise UnsupportedModelError(f"{name}: an FP8 shard from input {start} splits a "
                                        f"{block_cols}-input scale block")
        scale = scale[:, start // block_cols: -(-(start + length) // block_cols)]
    return Fp8Weight(_own(weight.codes[:, start:start + length]), scale.clone(),
                     weight.block_size, weight.source)


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that does not keep the full tensor's storage alive."""
    return tensor.clone(memory_format=torch.contiguous_format)
