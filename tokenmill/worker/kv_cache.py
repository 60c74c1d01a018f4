"""The paged KV cache pool: how many blocks fit the memory budget, and the per-layer tensors.

Each layer gets one tensor ``[2, num_blocks, block_size, kv_heads, head_dim]``: K then V; a token's
slot is ``block_id * block_size + offset``. With tensor parallelism each rank caches only its KV
heads (``tensor_parallel_size`` ranks: KV heads / ranks, or 1 replicated head). Allocated with ``torch.empty``: on a CPU the pages are
only touched (and counted as resident) as blocks get used.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from tokenmill.config import CacheConfig
from tokenmill.distributed.sharding import num_kv_heads_per_rank
from tokenmill.errors import ConfigError
from tokenmill.models.arch_config import ArchConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def describe(self, request_len: int = 2048) -> str:
        fit = self.num_tokens // request_len
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = "
                f"{self.num_tokens} tokens, {self.num_bytes / 2**20:.1f} MiB; "
                f"{fit} requests of {request_len} tokens fit at once")


def free_device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available


def plan_kv_cache(arch: ArchConfig, cache: CacheConfig, dtype: torch.dtype,
                  device: torch.device, tensor_parallel_size: int = 1) -> KVCacheSpec:
    """Blocks of this rank's cache that fit its budget (every rank gets the same count)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    kv_heads = num_kv_heads_per_rank(arch.num_key_value_heads, tensor_parallel_size)
    bytes_per_block = (arch.num_hidden_layers * 2 * cache.block_size * kv_heads
                       * arch.head_dim * element_size)
    if cache.kv_cache_memory > 1:
        budget = int(cache.kv_cache_memory)
    else:
        budget = int(free_device_memory(device) * cache.kv_cache_memory)
    num_blocks = budget // bytes_per_block
    if num_blocks < 1:
        raise ConfigError(
            f"kv_cache_memory={cache.kv_cache_memory} gives {budget} bytes, less than one KV block "
            f"({bytes_per_block} bytes); raise kv_cache_memory", param="kv_cache_memory")
    # A pool smaller than one full-context request is legal: such requests are refused at
    # admission with the numbers, shorter ones run.
    return KVCacheSpec(num_blocks, cache.block_size, bytes_per_block)


def allocate_kv_cache(arch: ArchConfig, spec: KVCacheSpec, dtype: torch.dtype,
                      device: torch.device, tensor_parallel_size: int = 1) -> list[torch.Tensor]:
    kv_heads = num_kv_heads_per_rank(arch.num_key_value_heads, tensor_parallel_size)
    shape = (2, spec.num_blocks, spec.block_size, kv_heads, arch.head_dim)
    # One allocation for every layer, each layer a contiguous view of it. On the CPU a pool of
    # hundreds of MB is then always fresh pages from the kernel, none resident until a block is
    # used; per-layer tensors of a few MB each came partly from the heap pages the load had just
    # freed, resident from the start (measured: ~25 MB more RSS after load with a 512 MB pool).
    pool = torch.empty((arch.num_hidden_layers, *shape), dtype=dtype, device=device)
    return list(pool.unbind(0))


def copy_blocks(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """Copy whole blocks (K and V, every layer): ``copies`` holds (source, destination) ids."""
    if not copies:
        return
    device = kv_caches[0].device
    sources = torch.tensor([s for s, _ in copies], dtype=torch.long, device=device)
    destinations = torch.tensor([d for _, d in copies], dtype=torch.long, device=device)
    for cache in kv_caches:
        cache.index_copy_(1, destinations, cache.index_select(1, sources))
