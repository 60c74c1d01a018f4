"""The native decode kernel attends exactly like the PyTorch path over the same paged cache."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.attention import AttentionMetadata, DecodeBatch, paged_attention
from tokenmill.layers.kernels import paged_attention_module


def _decode_case(num_seqs: int, heads: int, kv_heads: int, lengths: list[int], dtype: torch.dtype,
                 window: int | None, head_dim: int = 64):
    torch.manual_seed(0)
    block_size = 16
    max_blocks = max(-(-n // block_size) for n in lengths)
    num_blocks = max(256, num_seqs * max_blocks)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype)
    table = torch.randperm(num_blocks)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    seq_lens = torch.tensor(lengths)
    positions = torch.arange(max_blocks * block_size)[None, :]
    mask = positions < seq_lens[:, None]
    if window is not None:
        mask &= positions > seq_lens[:, None] - 1 - window
    batch = DecodeBatch(token_rows=torch.arange(num_seqs), block_table=table, seq_lens=seq_lens,
                        mask=mask[:, None, None, :])
    query = torch.randn(num_seqs, heads, head_dim).to(dtype)
    # the new token's K/V: write it into its slot, as the model does
    key = torch.randn(num_seqs, kv_heads, head_dim).to(dtype)
    value = torch.randn(num_seqs, kv_heads, head_dim).to(dtype)
    last = seq_lens - 1
    slots = table[torch.arange(num_seqs), last // block_size] * block_size + last % block_size
    return cache, batch, query, key, value, slots


@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kernel_matches_torch(heads, kv_heads, window, dtype):
    module = paged_attention_module()
    if module is None:
        pytest.skip("no C++ toolchain: the engine uses the PyTorch path (tested everywhere else)")
    lengths = [1, 15, 16, 17, 100, 300]
    cache, batch, query, key, value, slots = _decode_case(len(lengths), heads, kv_heads, lengths,
                                                          dtype, window)
    results = []
    for kernel in (None, module):
        meta = AttentionMetadata(slot_mapping=slots, decode=batch, decode_kernel=kernel,
                                 sliding_window=window)
        results.append(paged_attention(query, key, value, cache.clone(), meta, scale=0.125))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (results[0].float() - results[1].float()).abs().max().item() < tolerance


def _compare_with_torch(lengths: list[int], heads: int, kv_heads: int, dtype: torch.dtype,
                        window: int | None, head_dim: int) -> None:
    module = paged_attention_module()
    if module is None:
        pytest.skip("no C++ toolchain: the engine uses the PyTorch path (tested everywhere else)")
    cache, batch, query, key, value, slots = _decode_case(len(lengths), heads, kv_heads, lengths,
                                                          dtype, window, head_dim)
    results, caches = [], []
    for kernel in (None, module):
        meta = AttentionMetadata(slot_mapping=slots, decode=batch, decode_kernel=kernel,
                                 sliding_window=window)
        caches.append(cache.clone())
        results.append(paged_attention(query, key, value, caches[-1], meta, scale=0.125))
    # the kernel writes the new tokens' K/V into their slots exactly as index_copy_ does
    assert torch.equal(caches[0], caches[1])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (results[0].float() - results[1].float()).abs().max().item() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"),
                         [(9, 3, 64), (14, 2, 64), (32, 8, 128), (8, 2, 80), (12, 1, 64)])
@pytest.mark.parametrize("window", [None, 100])
def test_one_long_sequence_split_over_threads(dtype, heads, kv_heads, head_dim, window):
    """One sequence is cut into ranges of positions attended in parallel and merged (split-K);
    ranges longer than the kernel's chunk go through its online softmax. Group sizes 3, 7, 4
    (specialized), 4 with head dim 80 and 12 (generic path) all agree with PyTorch."""
    _compare_with_torch([777], heads, kv_heads, dtype, window, head_dim)


def test_mixed_lengths_and_a_one_token_sequence():
    _compare_with_torch([1, 2, 64, 65, 600, 1000, 17], 9, 3, torch.bfloat16, None, 64)
