"""The sharded layers, one rank at a time in this process: what each rank keeps of a checkpoint
tensor, and that the ranks' partial results add (row-parallel, embedding) or concatenate (LM head)
to the unsharded layer's output. Collectives are replaced by a stand-in that records its input."""

from __future__ import annotations

import torch

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.layers.parallel_embedding import VocabParallelEmbedding
from tokenmill.layers.parallel_linear import (
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelHead,
    gather_logits,
)
from tokenmill.quant.registry import get_quant_method


class LocalRank(ParallelContext):
    """A rank whose all-reduce returns its own partial result (the test adds them up)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _ranks(world_size: int) -> list[LocalRank]:
    return [LocalRank(rank=r, world_size=world_size) for r in range(world_size)]


def test_row_parallel_partial_outputs_sum_to_the_full_layer_with_its_bias_once():
    weight, bias, x = torch.randn(8, 96), torch.randn(8), torch.randn(5, 96)
    total = torch.zeros(5, 8)
    for rank in _ranks(3):
        layer = RowParallelLinear(96, 8, True, torch.float32, "cpu", rank)
        layer.load_shard("", "weight", weight)
        layer.load_shard("", "bias", bias)
        layer.finalize("o_proj", get_quant_method("none"))
        assert layer.weight.shape == (8, 32)
        total += layer(x[:, 32 * rank.rank:32 * (rank.rank + 1)])  # its part of the input
    torch.testing.assert_close(total, x @ weight.T + bias)


def test_qkv_keeps_this_ranks_heads_and_the_kv_head_they_read():
    head_dim, hidden = 4, 16
    q, k, v = torch.randn(6 * head_dim, hidden), torch.randn(2 * head_dim, hidden), torch.randn(
        2 * head_dim, hidden)
    for rank in _ranks(6):  # 6 query heads, 2 KV heads: each KV head on 3 ranks
        layer = QKVParallelLinear(hidden, head_dim, 6, 2, True, torch.float32, "cpu", rank)
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            layer.load_shard(name, "weight", tensor)
            layer.load_shard(name, "bias", tensor[:, 0])  # Qwen2's q/k/v biases: same rows
        layer.finalize("qkv_proj", get_quant_method("none"))
        assert (layer.num_heads, layer.num_kv_heads) == (1, 1)
        kv_head = rank.rank // 3  # query head r reads KV head r // (6 / 2)
        rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
        expected = torch.cat([q[rank.rank * head_dim:(rank.rank + 1) * head_dim], k[rows],
                              v[rows]])
        assert torch.equal(layer.weight, expected)
        assert torch.equal(layer.bias, expected[:, 0])


def test_vocab_parallel_embedding_and_head_with_a_vocabulary_that_does_not_split_evenly():
    vocab, hidden = 10, 4  # 3 ranks: 4 + 4 + 2 rows
    table, ids, x = torch.randn(vocab, hidden), torch.tensor([0, 3, 4, 9, 8]), torch.randn(2, 4)
    embedded = torch.zeros(len(ids), hidden)
    local_logits = []
    for rank in _ranks(3):
        embedding = VocabParallelEmbedding(vocab, hidden, torch.float32, "cpu", rank)
        embedding.load(table, keep_quantized=False)
        embedded += embedding(ids)
        local_logits.append(embedding.tie_head().local(x))
        padded = embedding.padded_rows
    torch.testing.assert_close(embedded, table[ids])
    assert [t.shape[-1] for t in local_logits] == [4, 4, 2]

    class Gathering(LocalRank):
        def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
            parts = [torch.nn.functional.pad(t, (0, padded - t.shape[-1])) for t in local_logits]
            assert tensor.shape == parts[self.rank].shape
            return torch.cat(parts, dim=-1)

    logits = gather_logits(local_logits[2], Gathering(rank=2, world_size=3), vocab, padded)
    torch.testing.assert_close(logits, x @ table.T)

    head = VocabParallelHead(hidden, vocab, torch.float32, "cpu", LocalRank(rank=2, world_size=3))
    head.load_shard("", "weight", table)
    head.finalize("lm_head", get_quant_method("none"))
    assert torch.equal(head.weight, table[8:])
