"""The native decode kernel attends exactly like the PyTorch path over the same paged cache."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.attention import AttentionMetadata, DecodeBatch, paged_attention
from tokenmill.layers.kernels import paged_attention_module


def _decode_case(num_seqs: int, heads: int, kv_heads: int, lengths: list[int], dtype: torch.dtype,
                 window: int | None):
    torch.manual_seed(0)
    block_size, head_dim, num_blocks = 16, 64, 256
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim).to(dtype)
    max_blocks = max(-(-n // block_size) for n in lengths)
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
