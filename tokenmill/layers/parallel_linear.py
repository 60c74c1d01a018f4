"""Tensor-parallel linear layers (Megatron-LM's split, as vLLM does it).

* ``ColumnParallelLinear``: each rank keeps a range of every shard's output rows; the output stays
  split (each rank computes its own heads / its part of the intermediate dimension). No
  communication.
* ``QKVParallelLinear``: the column-parallel q/k/v of attention, cut by heads (KV heads replicated
  when there are fewer than ranks: see ``tokenmill.distributed.sharding``).
* ``RowParallelLinear``: each rank keeps a range of the input columns and multiplies its part of
  the input; the partial outputs are summed by an all-reduce. The bias is added by rank 0 only, so
  the sum holds it once.
* ``VocabParallelHead``: an untied LM head split by vocabulary rows; the logits are all-gathered.

All are ``MergedLinear`` underneath: loading (``load_shard`` takes the checkpoint's full tensor
and keeps this rank's slice), quantization (``finalize``) and the weight report are unchanged, and
with one rank they are exactly a ``MergedLinear``.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.distributed.sharding import (
    even_range,
    head_shard,
    slice_cols,
    slice_rows,
    vocab_range,
)
from tokenmill.layers.linear import MergedLinear


class ColumnParallelLinear(MergedLinear):
    """``shard_sizes`` are the checkpoint's (full) sizes; ``row_ranges`` say which
    ``(start, length)`` of each this rank keeps (default: an even split)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool,
                 dtype: torch.dtype, device: torch.device | str, parallel: ParallelContext,
                 row_ranges: dict[str, tuple[int, int]] | None = None):
        ranges = row_ranges or {name: even_range(size, parallel.rank, parallel.world_size)
                                for name, size in shard_sizes.items()}
        super().__init__(in_features, {name: ranges[name][1] for name in shard_sizes}, bias,
                         dtype, device)
        self.parallel = parallel
        self.full_sizes = dict(shard_sizes)
        self.row_ranges = ranges

    def load_shard(self, shard: str, kind: str, tensor: Any) -> None:
        if not self.parallel.is_parallel:
            return super().load_shard(shard, kind, tensor)
        full = self.full_sizes[shard]
        expected = (full,) if kind == "bias" else (full, self.in_features)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shard {shard}.{kind} has shape {tuple(tensor.shape)}, expected "
                             f"{expected}")
        start, length = self.row_ranges[shard]
        super().load_shard(shard, kind, slice_rows(tensor, start, length))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v cut by attention heads; ``num_heads`` / ``num_kv_heads`` are this rank's."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, dtype: torch.dtype, device: torch.device | str,
                 parallel: ParallelContext):
        heads = head_shard(num_heads, num_kv_heads, parallel.rank, parallel.world_size)
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        kv_rows = (heads.kv_head_start * head_dim, heads.num_kv_heads * head_dim)
        super().__init__(
            hidden_size,
            {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
             "v": num_kv_heads * head_dim},
            bias, dtype, device, parallel,
            row_ranges={"q": (heads.head_start * head_dim, heads.num_heads * head_dim),
                        "k": kv_rows, "v": kv_rows})


class RowParallelLinear(MergedLinear):
    """Keeps input columns ``[rank * K / N, (rank + 1) * K / N)``; the output is all-reduced,
    unless ``reduce_results`` is False: then the caller sums several layers' partial outputs
    with one all-reduce (an MoE block: its experts and its shared expert)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str, parallel: ParallelContext,
                 reduce_results: bool = True):
        self.full_in_features = in_features
        self.input_start, local_in = even_range(in_features, parallel.rank, parallel.world_size)
        super().__init__(local_in, {"": out_features}, bias, dtype, device)
        self.parallel = parallel
        self.reduce_results = reduce_results

    def load_shard(self, shard: str, kind: str, tensor: Any) -> None:
        if not self.parallel.is_parallel or kind == "bias":
            return super().load_shard(shard, kind, tensor)
        expected = (self.out_features, self.full_in_features)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shard {shard}.{kind} has shape {tuple(tensor.shape)}, expected "
                             f"{expected}")
        name = f"a row-parallel weight {expected}"
        super().load_shard(shard, kind,
                           slice_cols(tensor, self.input_start, self.in_features, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_parallel:
            return self.op(x, self.bias)
        out = self.op(x, self.bias if self.parallel.rank == 0 else None)
        return self.parallel.all_reduce(out) if self.reduce_results else out


class VocabParallelHead(ColumnParallelLinear):
    """An untied LM head: this rank's vocabulary rows; ``forward`` gives the full logits."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                 device: torch.device | str, parallel: ParallelContext):
        start, length, self.padded_rows = vocab_range(vocab_size, parallel.rank,
                                                      parallel.world_size)
        self.vocab_size = vocab_size
        super().__init__(hidden_size, {"": vocab_size}, False, dtype, device, parallel,
                         row_ranges={"": (start, length)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_logits(self.op(x, None), self.parallel, self.vocab_size, self.padded_rows)


def gather_logits(local: torch.Tensor, parallel: ParallelContext, vocab_size: int,
                  padded_rows: int) -> torch.Tensor:
    """Every rank's vocabulary slice of the logits, concatenated: ``[..., vocab_size]``."""
    if not parallel.is_parallel:
        return local
    if local.shape[-1] < padded_rows:  # the last rank's slice is short when N does not divide V
        local = torch.nn.functional.pad(local, (0, padded_rows - local.shape[-1]))
    return parallel.all_gather_last_dim(local)[..., :vocab_size]
