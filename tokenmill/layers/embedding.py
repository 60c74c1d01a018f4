"""The token embedding, which is also the LM head when the model ties them.

A quantized embedding (GGUF's Q8_0 ``token_embd``) stays quantized: a lookup dequantizes only the
rows of the tokens in the batch, and the tied LM head multiplies by the same codes in the native
kernel, so the model never holds a float copy of its largest matrix. Once the head is tied, the
kernel's packed layout is the only copy (lookups unpack the 16-row tiles they need): one Q8_0
matrix in memory, not two (29 MiB for the built-in model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.layers.linear import LinearOp, _to_device, make_linear_op
from tokenmill.quant.registry import to_dense
from tokenmill.quant.weight import QuantizedWeight


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.table: torch.Tensor | None = None  # dense lookup table
        self.quantized: QuantizedWeight | None = None  # quantized lookup table
        self.head: LinearOp | None = None  # the tied LM head, when asked for
        self.packed: Any = None  # the head's kernel layout, when it is the only copy
        self.source: str | None = None  # "gguf:Q8_0" etc. for a quantized table

    @property
    def shape(self) -> tuple[int, int]:
        return (self.vocab_size, self.hidden_size)

    def load(self, weight: Any, keep_quantized: bool) -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"embedding has shape {tuple(weight.shape)}, expected {self.shape}")
        if isinstance(weight, QuantizedWeight) and keep_quantized:
            # the loader reads codes into CPU memory; a lookup indexes them with the batch's
            # token ids, which live on the model's device
            self.quantized = weight if self.device.type == "cpu" else _to_device(weight,
                                                                                  self.device)
            self.source = weight.source
        else:
            self.table = to_dense(weight, self.dtype).to(self.device)

    def tie_head(self) -> LinearOp:
        """The LM head that reads this same matrix."""
        if self.head is None:
            self.head = make_linear_op(self.quantized if self.quantized is not None else
                                       self.table, self.dtype, self.device)
            packed = getattr(self.head, "packed", None)
            if self.quantized is not None and packed is not None:
                self.packed, self.quantized = packed, None
        return self.head

    @property
    def weight(self) -> torch.Tensor:
        if self.table is not None:
            return self.table
        if self.packed is not None:
            return self.head.dense(self.dtype)
        return self.quantized.dequantize(self.dtype)

    def nbytes(self) -> int:
        if self.table is not None:
            return self.table.numel() * self.table.element_size()
        if self.packed is not None:
            return self.packed.nbytes()
        return self.quantized.nbytes()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return nn.functional.embedding(input_ids, self.table)
        if self.packed is not None:
            from tokenmill.layers.kernels.quant_matmul import dequantize_packed_rows

            return dequantize_packed_rows(self.packed, input_ids, self.dtype)
        return self.quantized.dequantize_rows(input_ids, self.dtype)
