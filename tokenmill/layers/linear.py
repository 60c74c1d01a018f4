"""Linear layers that fuse several checkpoint matrices into one matmul (q/k/v, gate/up), in any weight
format: dense, weight-only quantized (``QuantizedWeight``, run by the native kernel) or FP8.

Checkpoints store ``q_proj``, ``k_proj``, ``v_proj`` separately; one fused matrix reads the input once
per step instead of three times. ``load_shard`` keeps each checkpoint tensor as the loader produced it
(nothing is allocated up front, so a 4-bit model never holds a float copy); ``finalize`` stacks the
shards and lets the ``--quantization`` method decide what the layer computes with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.quant.registry import QuantMethod, to_dense
from tokenmill.quant.weight import QuantizedWeight, concat_rows, widened_to_match


class MergedLinear(nn.Module):
    """``y = x @ W.T (+ b)`` where W stacks the output rows of several named shards."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.in_features = in_features
        self.dtype = dtype
        self.device = torch.device(device)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.out_features = offset
        self.bias = (nn.Parameter(torch.zeros(offset, dtype=dtype, device=device),
                                  requires_grad=False) if bias else None)
        self._pending: dict[str, Any] = {}
        self.op: LinearOp | None = None

    def load_shard(self, shard: str, kind: str, tensor: Any) -> None:
        start, size = self.shard_offsets[shard]
        expected = (size,) if kind == "bias" else (size, self.in_features)
        if kind == "bias" and self.bias is None:
            raise ValueError(f"shard {shard}.bias given to a layer without a bias")
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shard {shard}.{kind} has shape {tuple(tensor.shape)}, expected "
                             f"{expected}")
        if kind == "bias":
            self.bias.data[start:start + size].copy_(tensor)
        else:
            self._pending[shard] = tensor

    def finalize(self, name: str, method: QuantMethod) -> None:
        """Stack the loaded shards and prepare the weight with ``method`` (once, after loading)."""
        parts = [self._pending.pop(shard) for shard in self.shard_offsets]
        weight = method.prepare(name, _stack(parts), self.dtype)
        self.op = make_linear_op(weight, self.dtype, self.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[N, K]`` matrix (dequantized when the layer is quantized): for tests and tools."""
        return self.op.dense(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.bias)


def _stack(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, QuantizedWeight) for p in parts):
        if all(parts[0].can_concat(p) for p in parts[1:]):
            return concat_rows(parts)
        widened = widened_to_match(parts)
        if widened is not None:
            return concat_rows(widened)
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    first = parts[0]
    if type(first).__name__ == "Fp8Weight" and all(first.can_concat(p) for p in parts[1:]):
        from tokenmill.quant.fp8 import concat_fp8

        return concat_fp8(parts)
    # shards in different formats (a mixed GGUF file): one dense matrix, the method decides
    return torch.cat([to_dense(p, torch.float32) for p in parts])


class LinearOp:
    """What a finalized layer computes with; ``dense`` gives the matrix back for inspection."""

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class DenseOp(LinearOp):
    def __init__(self, weight: torch.Tensor):
        self.matrix = weight.contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.linear(x, self.matrix, bias)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return self.matrix.to(dtype)

    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()

    def describe(self) -> str:
        return str(self.matrix.dtype).removeprefix("torch.")


class QuantizedOp(LinearOp):
    """Weight-only quantized: the native kernel on CPU, dequantize-and-matmul elsewhere."""

    def __init__(self, weight: QuantizedWeight, device: torch.device):
        from tokenmill.layers.kernels import quant_matmul

        self.weight = weight
        self.kernels = quant_matmul
        self.packed = quant_matmul.pack(weight) if device.type == "cpu" else None
        if self.packed is not None:
            self.weight = None  # the kernel's layout holds everything; do not keep two copies
        else:  # GPU: keep the codes on the device and dequantize per call (no fused kernel yet)
            self.weight = _to_device(weight, device)
        self.source = weight.source
        self.bits = weight.bits

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return self.kernels.quant_linear(x, self.packed, bias)
        return nn.functional.linear(x, self.weight.dequantize(x.dtype), bias)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.packed is not None:
            return self.kernels.unpack(self.packed).dequantize(dtype)
        return self.weight.dequantize(dtype)

    def nbytes(self) -> int:
        return self.packed.nbytes() if self.packed is not None else self.weight.nbytes()

    def describe(self) -> str:
        return self.source or f"int{self.bits}"


class DuckTypedOp(LinearOp):
    """A weight form that computes itself (FP8): ``linear``, ``dequantize``, ``nbytes``."""

    def __init__(self, weight: Any):
        self.weight = weight

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight.linear(x, bias)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def nbytes(self) -> int:
        return self.weight.nbytes()

    def describe(self) -> str:
        return getattr(self.weight, "source", type(self.weight).__name__)


def make_linear_op(weight: Any, dtype: torch.dtype, device: torch.device) -> LinearOp:
    if isinstance(weight, torch.Tensor):
        return DenseOp(weight.to(device=device, dtype=dtype))
    if isinstance(weight, QuantizedWeight):
        return QuantizedOp(weight, device)
    return DuckTypedOp(weight.to(device, dtype) if hasattr(weight, "to") else weight)


def _to_device(weight: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)
    return QuantizedWeight(weight.bits, weight.group_size, move(weight.qweight),
                           move(weight.scales), move(weight.mins), move(weight.input_perm),
                           weight.source)
