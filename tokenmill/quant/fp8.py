"""FP8 (float8_e4m3fn) weights: the ``fp8`` method, FP8 safetensors checkpoints, the layer's matmul.

``Fp8Weight`` holds codes ``[N, K]`` and float32 scales, ``W = codes * scale``, with the scale

* per tensor (a 0-d tensor), or per output channel (``[N]``): what ``quantize_fp8`` and most FP8
  checkpoints (compressed-tensors "float-quantized", AutoFP8) produce;
* per ``block_size = (bn, bk)`` block (``[ceil(N / bn), ceil(K / bk)]``): DeepSeek-style checkpoints
  (``weight_scale_inv``, multiplied despite its name) and compressed-tensors' "block" strategy.

It is not a ``QuantizedWeight`` (the native kernel reads integer codes), so the linear layer calls
``linear`` on it. On CPU that dequantizes a few hundred rows at a time, so no dense copy of the
matrix is ever held; on a GPU with FP8 tensor cores (compute capability 8.9+) it runs
``torch._scaled_mm``, and on older GPUs ``to(device)`` dequantizes once at load. Activations stay in
the compute dtype on CPU: this is weight-only FP8, so checkpoints' ``input_scale`` is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmill.errors import CorruptModelFileError, UnsupportedModelError
from tokenmill.quant.registry import register, to_dense

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Rows dequantized per step on CPU: 256 rows of a 4096-wide bf16 matrix are 2 MiB (cache-sized).
TILE_ROWS = 256
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Fp8Weight:
    codes: torch.Tensor  # float8_e4m3fn [N, K]
    # float32: [] per tensor, [N] per channel, [ceil(N / bn), ceil(K / bk)] per block
    scale: torch.Tensor
    block_size: tuple[int, int] | None = None
    source: str = "fp8"
    # set by to(device) on a GPU without FP8 matmuls: the dense matrix it computes with instead
    dense_fallback: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def nbytes(self) -> int:
        if self.dense_fallback is not None:
            return self.dense_fallback.numel() * self.dense_fallback.element_size()
        return self.codes.numel() + self.scale.numel() * self.scale.element_size()

    def row_scales(self, rows: torch.Tensor) -> torch.Tensor:
        """The scale of each element of ``W[rows]``, broadcastable to ``[len(rows), K]``."""
        if self.block_size is not None:
            block_rows, block_cols = self.block_size
            per_block = self.scale[rows.to(self.scale.device) // block_rows]
            return per_block.repeat_interleave(block_cols, dim=1)[:, :self.in_features]
        if self.scale.dim() == 0:
            return self.scale
        return self.scale[rows.to(self.scale.device)].unsqueeze(1)

    def dequantize_rows(self, rows: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W[rows]`` (all rows when None) in ``dtype``."""
        rows = torch.arange(self.out_features) if rows is None else rows
        codes = self.codes[rows.to(self.codes.device)].to(torch.float32)
        return (codes * self.row_scales(rows)).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(None, dtype)

    def can_concat(self, other: Any) -> bool:
        if not isinstance(other, Fp8Weight) or other.in_features != self.in_features:
            return False
        if self.block_size is None or other.block_size is None:
            return self.block_size is None and other.block_size is None
        # block scales stack only when no block straddles two shards
        return (self.block_size == other.block_size and self.out_features % self.block_size[0] == 0
                and other.out_features % self.block_size[0] == 0)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Fp8Weight:
        """This weight on ``device``. On a GPU without FP8 matmuls the dense matrix (in ``dtype``,
        default bfloat16) is made here, at load, so it is counted before the KV cache is sized."""
        device = torch.device(device)
        if device.type == "cuda" and not _has_fp8_matmul(device):
            dense = self.dequantize(dtype or torch.bfloat16).to(device)
            return Fp8Weight(self.codes, self.scale, self.block_size, self.source, dense)
        return Fp8Weight(self.codes.to(device), self.scale.to(device), self.block_size,
                         self.source)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` in ``x.dtype`` for ``x`` of shape ``[..., K]``."""
        flat = x.reshape(-1, self.in_features)
        if self.dense_fallback is not None:
            out = nn.functional.linear(flat, self.dense_fallback.to(x.dtype), bias)
        elif flat.is_cuda and self.can_scaled_mm() and _has_fp8_matmul(flat.device):
            out = scaled_mm_linear(self, flat, bias)
        else:
            out = self._tiled_linear(flat, bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def can_scaled_mm(self) -> bool:
        """Whether ``torch._scaled_mm`` can take these codes (dimensions divisible by 16)."""
        return (self.block_size is None and self.in_features % 16 == 0
                and self.out_features % 16 == 0 and hasattr(torch, "_scaled_mm"))

    def _tiled_linear(self, flat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype, device=flat.device)
        for start in range(0, self.out_features, TILE_ROWS):
            stop = min(start + TILE_ROWS, self.out_features)
            if self.block_size is None:
                # e4m3 codes are exact in bf16/fp16/fp32 and the scale is constant along K, so
                # it is applied to the [M, tile] product instead of the [tile, K] weights
                product = flat @ self.codes[start:stop].to(flat.dtype).T
                scale = self.scale if self.scale.dim() == 0 else self.scale[start:stop]
                out[:, start:stop] = product * scale
            else:
                rows = torch.arange(start, stop)
                out[:, start:stop] = flat @ self.dequantize_rows(rows, flat.dtype).T
        if bias is not None:
            out += bias
        return out


def _has_fp8_matmul(device: torch.device) -> bool:
    # FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0)
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_linear(weight: Fp8Weight, flat: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``flat @ W.T`` on FP8 tensor cores: activations quantized per tensor on the fly, the weight's
    own scale applied to the float32 product (tensor-wise scaling is the recipe every FP8 GPU and
    torch version supports; the per-channel factor is one multiply of the small output)."""
    num_rows = flat.shape[0]
    padded = -num_rows % 16  # early torch versions also wanted M divisible by 16
    if padded:
        flat = nn.functional.pad(flat, (0, 0, 0, padded))
    x_scale = (flat.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    x_codes = (flat.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous()
    one = torch.ones((), dtype=torch.float32, device=flat.device)
    # mat2 must be column-major [K, N]: the transpose of the row-major codes is exactly that
    out = torch._scaled_mm(x_codes, weight.codes.t(), scale_a=x_scale, scale_b=one,
                           out_dtype=torch.float32)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    out = out[:num_rows] * weight.scale.to(out.device)
    if bias is not None:
        out = out + bias.float()
    return out.to(flat.dtype)


def quantize_fp8(dense: torch.Tensor, per_channel: bool = True) -> Fp8Weight:
    """``dense`` [N, K] -> FP8 codes, a float32 absmax scale per row (or for the whole tensor)."""
    w = dense.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    divisor = scale.unsqueeze(1) if per_channel else scale
    codes = (w / divisor).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Weight(codes, scale, None, "fp8")


def concat_fp8(parts: list[Fp8Weight]) -> Fp8Weight:
    """Stack the output rows of weights that ``can_concat`` (fused q/k/v and gate/up). Per-tensor
    scales differ between shards, so they become per-channel (lossless)."""
    first = parts[0]
    codes = torch.cat([p.codes for p in parts])
    if first.block_size is not None:
        return Fp8Weight(codes, torch.cat([p.scale for p in parts]), first.block_size, first.source)
    scales = [p.scale.expand(p.out_features) if p.scale.dim() == 0 else p.scale for p in parts]
    return Fp8Weight(codes, torch.cat(scales), None, first.source)


class Fp8WeightOnly:
    name = "fp8"

    def prepare(self, name: str, weight: Any, dtype: torch.dtype) -> Any:
        if isinstance(weight, Fp8Weight):
            return weight  # an FP8 checkpoint: keep its own scales
        return quantize_fp8(to_dense(weight, torch.float32), per_channel=True)


register("fp8")(lambda group_size: Fp8WeightOnly())


@dataclass(frozen=True)
class Fp8CheckpointFormat:
    """FP8 safetensors checkpoints: ``<prefix>.weight`` in float8_e4m3fn plus its scale tensor."""

    scale_part: str  # "weight_scale", or DeepSeek's "weight_scale_inv"
    block_size: tuple[int, int] | None
    name: str = "fp8"
    optional_parts: frozenset[str] = frozenset()
    # activation and KV-cache scales: weight-only FP8 keeps activations in the compute dtype
    dropped_parts: frozenset[str] = frozenset({"input_scale", "k_scale", "v_scale", "kv_scale"})

    @property
    def required_parts(self) -> frozenset[str]:
        return frozenset({"weight", self.scale_part})

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path | str) -> Fp8CheckpointFormat:
        if config.get("quant_method") == "fp8":  # transformers' FP8 / AutoFP8 / DeepSeek layout
            if config.get("fmt", "e4m3") != "e4m3":
                raise UnsupportedModelError(f"{where}: FP8 fmt={config['fmt']!r} is not supported "
                                            "(tokenmill reads e4m3)")
            block = config.get("weight_block_size")
            if block:
                return cls("weight_scale_inv", _block_size(block, where))
            return cls("weight_scale", None)
        return cls("weight_scale", _compressed_tensors_block(config, where))

    def is_part(self, part: str, tensor: torch.Tensor) -> bool:
        if part != "weight":
            return part == self.scale_part
        if tensor.dtype in (torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
            raise UnsupportedModelError(f"weights in {tensor.dtype} are not supported "
                                        "(tokenmill reads float8_e4m3fn)")
        return tensor.dtype == FP8_DTYPE  # layers left unquantized (lm_head, ...) pass through

    def convert(self, prefix: str, parts: dict[str, torch.Tensor]) -> Fp8Weight:
        return fp8_checkpoint_weight(prefix, parts["weight"], f"{prefix}.{self.scale_part}",
                                     parts[self.scale_part], self.block_size)


def fp8_checkpoint_weight(prefix: str, codes: torch.Tensor, scale_name: str, scale: torch.Tensor,
                          block_size: tuple[int, int] | None) -> Fp8Weight:
    """One layer's FP8 ``weight`` and its scale as an ``Fp8Weight``."""
    if codes.dim() != 2:
        raise CorruptModelFileError(f"{prefix}.weight has shape {tuple(codes.shape)}, expected 2 "
                                    "dimensions")
    if scale.dtype not in SCALE_DTYPES:
        raise CorruptModelFileError(f"{scale_name} has dtype {scale.dtype}, expected a float type")
    rows, cols = codes.shape
    scale = scale.to(torch.float32)
    if block_size is not None:
        expected = (math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1]))
        if tuple(scale.shape) != expected:
            raise CorruptModelFileError(f"{scale_name} has shape {tuple(scale.shape)}, expected "
                                        f"{expected} ({block_size[0]}x{block_size[1]} blocks)")
        return Fp8Weight(codes, scale.contiguous(), block_size, "fp8")
    if scale.numel() == 1:
        return Fp8Weight(codes, scale.reshape(()), None, "fp8")
    if tuple(scale.shape) in ((rows,), (rows, 1)):
        return Fp8Weight(codes, scale.reshape(rows).contiguous(), None, "fp8")
    raise CorruptModelFileError(f"{scale_name} has shape {tuple(scale.shape)}, expected () or "
                                f"({rows},) or ({rows}, 1)")


def _block_size(block: Any, where: Path | str) -> tuple[int, int]:
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedModelError(f"{where}: FP8 weight block size {block!r} is not two "
                                    "positive integers")
    return (block[0], block[1])


def _compressed_tensors_block(config: dict[str, Any], where: Path | str) -> tuple[int, int] | None:
    """compressed-tensors FP8: check every quantization group is FP8 weights, return the block size
    if the weights are scaled per block."""
    blocks, others = set(), set()
    for group_name, group in (config.get("config_groups") or {}).items():
        fmt = group.get("format") or config.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise UnsupportedModelError(f"{where}: compressed-tensors format {fmt!r} "
                                        f"({group_name}) is not supported (tokenmill reads "
                                        "float-quantized FP8)")
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise UnsupportedModelError(
                f"{where}: compressed-tensors {group_name} weights are "
                f"{weights.get('num_bits')}-bit {weights.get('type')!r}; tokenmill reads 8-bit "
                "float")
        strategy = weights.get("strategy", "tensor")
        if strategy == "block":
            blocks.add(_block_size(weights.get("block_structure"), where))
        elif strategy in ("tensor", "channel"):
            others.add(strategy)
        else:
            raise UnsupportedModelError(f"{where}: compressed-tensors FP8 strategy {strategy!r} is "
                                        "not supported (tensor, channel or block)")
    if len(blocks) > 1 or (blocks and others):
        raise UnsupportedModelError(f"{where}: FP8 groups mix scaling strategies "
                                    f"({sorted(others)} and blocks {sorted(blocks)})")
    return blocks.pop() if blocks else None
