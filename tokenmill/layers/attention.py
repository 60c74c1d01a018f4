"""Attention over a paged KV cache.

Each layer's cache is one tensor ``[2, num_blocks, block_size, kv_heads, head_dim]`` (K then V); a
slot is ``block_id * block_size + offset``. New tokens' K/V are written through ``slot_mapping``
*before* attention reads, so a request may read KV written by another request in the same step (how
prefix sharing works for requests admitted together). Reads gather whole blocks through the block
table with ``index_select`` (contiguous block_size rows at a time, several times faster than a
per-slot gather on CPU), then use ``scaled_dot_product_attention`` (grouped-query heads broadcast by
``enable_gqa``).

Sequences are split in two groups, each handled with the fewest Python iterations:
* decodes (one new token each) are gathered into one padded batch and attended in one call;
* prefill chunks (several new tokens, maybe after cached context) are attended one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    query_start: int  # first row of this sequence in the flattened token batch
    query_len: int
    context_len: int  # tokens attended to = already computed + query_len
    block_ids: torch.Tensor | None  # [ceil(context_len / block_size)] the sequence's block table
    # [query_len, context_len] bool (True = attend). None = plain causal, valid only when
    # context_len == query_len (SDPA's is_causal aligns the triangle top-left).
    mask: torch.Tensor | None


@dataclass
class DecodeBatch:
    token_rows: torch.Tensor  # [B] rows of the decode tokens in the flattened batch
    block_table: torch.Tensor  # [B, max_blocks] (padding points at block 0, masked out)
    seq_lens: torch.Tensor  # [B] tokens each query attends to (itself included)
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] bool


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor | None  # [num_tokens] where each new token's K/V is written
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode: DecodeBatch | None = None
    # The native kernel module (tokenmill.layers.kernels) when decodes may use it, else None.
    decode_kernel: Any = None
    sliding_window: int | None = None


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    kv_cache: torch.Tensor | None, meta: AttentionMetadata, scale: float
                    ) -> torch.Tensor:
    """``query`` [T, heads, d], ``key``/``value`` [T, kv_heads, d] -> output [T, heads, d]."""
    if meta.decode is not None and meta.decode_kernel is not None and not meta.prefills:
        # a decode-only step (rows 0..B-1 in order): the kernel writes the new K/V into their
        # slots itself, and there is no gather into a batch, no scatter back
        batch = meta.decode
        return meta.decode_kernel.paged_decode_attention(
            query, kv_cache[0], kv_cache[1], batch.block_table, batch.seq_lens,
            scale, meta.sliding_window or 0, key, value, meta.slot_mapping)
    if kv_cache is not None:
        _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
        slots = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
        slots[0].index_copy_(0, meta.slot_mapping, key)
        slots[1].index_copy_(0, meta.slot_mapping, value)
    output = torch.empty_like(query)
    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_len)
        if kv_cache is None or span.context_len == span.query_len:
            # no earlier context: the keys are this step's own rows, no gather from the cache
            k, v = key[rows], value[rows]
        else:
            k, v = _gather(kv_cache, span.block_ids)
            k, v = k[: span.context_len], v[: span.context_len]
        # With a batch dimension torch's CPU flash-attention kernel takes the call; 3-D inputs
        # fell back to the math path (bmm + softmax + masking ops), 2-4x slower at 1024 tokens.
        out = F.scaled_dot_product_attention(
            query[rows].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=span.mask, is_causal=span.mask is None, scale=scale, enable_gqa=True,
        )
        output[rows] = out[0].transpose(0, 1)
    if meta.decode is not None and meta.decode_kernel is not None:
        batch = meta.decode
        out = meta.decode_kernel.paged_decode_attention(
            query[batch.token_rows], kv_cache[0], kv_cache[1], batch.block_table,
            batch.seq_lens, scale, meta.sliding_window or 0)
        output[batch.token_rows] = out
    elif meta.decode is not None:
        batch = meta.decode
        q = query[batch.token_rows].unsqueeze(2)  # [B, heads, 1, d]
        rows_ = batch.block_table.shape[0]
        k, v = _gather(kv_cache, batch.block_table.flatten())
        k = k.view(rows_, -1, *k.shape[1:]).transpose(1, 2)  # [B, kv_heads, L, d]
        v = v.view(rows_, -1, *v.shape[1:]).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scale,
                                             enable_gqa=True)
        output[batch.token_rows] = out.squeeze(2)
    return output


def _gather(kv_cache: torch.Tensor, block_ids: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given blocks, ``[len(block_ids) * block_size, kv_heads, d]`` each."""
    kv_heads, head_dim = kv_cache.shape[3:]
    k = kv_cache[0].index_select(0, block_ids).view(-1, kv_heads, head_dim)
    v = kv_cache[1].index_select(0, block_ids).view(-1, kv_heads, head_dim)
    return k, v


def attention_mask(query_positions: torch.Tensor, context_len: int,
                   sliding_window: int | None) -> torch.Tensor:
    """``[len(query_positions), context_len]`` bool: each query sees keys at positions <= its own
    (and within the sliding window, when the model has one)."""
    key_positions = torch.arange(context_len, device=query_positions.device)
    allowed = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return allowed


def causal_metadata(seq_lens: list[int], sliding_window: int | None = None,
                    device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for whole sequences attended without a cache (reference checks)."""
    spans, start = [], 0
    for length in seq_lens:
        mask = None
        if sliding_window is not None and length > sliding_window:
            mask = attention_mask(torch.arange(length, device=device), length, sliding_window)
        spans.append(PrefillSpan(start, length, length, None, mask))
        start += length
    return AttentionMetadata(slot_mapping=None, prefills=spans)
