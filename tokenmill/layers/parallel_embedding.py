"""The vocab-parallel token embedding (and tied LM head): each rank holds ``ceil(V / N)`` rows.

Vocab-parallel rather than replicated because the embedding is a large share of a small model (the
built-in model's Q8_0 table is 29 MiB of its ~100 MiB): replicated, every rank would hold it whole
and TP=3 would save only two thirds of the rest. The price is one all-reduce of the embeddings per
step (a lookup of a token outside this rank's rows gives zeros) and one all-gather of the logits,
both once per step, not per layer.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.distributed.sharding import slice_rows, vocab_range
from tokenmill.layers.embedding import VocabEmbedding
from tokenmill.layers.linear import LinearOp
from tokenmill.layers.parallel_linear import gather_logits


class VocabParallelEmbedding(VocabEmbedding):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str, parallel: ParallelContext):
        self.vocab_start, local, self.padded_rows = vocab_range(vocab_size, parallel.rank,
                                                                parallel.world_size)
        super().__init__(local, hidden_size, dtype, device)
        self.full_vocab_size = vocab_size
        self.parallel = parallel
        self._gathered_head: LinearOp | None = None

    def load(self, weight: Any, keep_quantized: bool) -> None:
        if not self.parallel.is_parallel:
            return super().load(weight, keep_quantized)
        expected = (self.full_vocab_size, self.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"embedding has shape {tuple(weight.shape)}, expected {expected}")
        super().load(slice_rows(weight, self.vocab_start, self.vocab_size), keep_quantized)

    def tie_head(self) -> LinearOp:
        """The tied LM head: this rank's rows, with the logits gathered from every rank."""
        local = super().tie_head()
        if not self.parallel.is_parallel:
            return local
        if self._gathered_head is None:
            self._gathered_head = _GatheredHead(local, self)
        return self._gathered_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_parallel:
            return super().forward(input_ids)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.vocab_size)
        hidden = super().forward(local_ids.masked_fill(outside, 0))
        hidden.masked_fill_(outside.unsqueeze(-1), 0)
        return self.parallel.all_reduce(hidden)


class _GatheredHead(LinearOp):
    def __init__(self, local: LinearOp, embedding: VocabParallelEmbedding):
        self.local = local
        self.embedding = embedding

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        e = self.embedding
        return gather_logits(self.local(x, bias), e.parallel, e.full_vocab_size, e.padded_rows)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return self.local.dense(dtype)

    def nbytes(self) -> int:
        return self.local.nbytes()

    def describe(self) -> str:
        return self.local.describe()
