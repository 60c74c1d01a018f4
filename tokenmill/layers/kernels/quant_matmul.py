"""Weight-only quantized matmul on the CPU: ``y = x @ W.T`` for a ``QuantizedWeight``.

``pack`` repacks a ``QuantizedWeight`` once at load into the native kernel's tile layout
(``quant_matmul.cpp`` describes it); ``quant_linear`` multiplies by it. The native paths:

* float32 x (the exact mode: what the dequantized weights give, up to float summation order):
  rows < ``DENSE_MIN_ROWS_FP32``: the exact kernel, which expands the packed codes to float32 in
  registers and FMAs them with x (no activation quantization); from there on, column chunks are
  dequantized to float32 and multiplied with torch's float32 GEMM;
* bfloat16 x: activations are quantized to int8 per 32-element block and the packed weights are
  streamed once through integer dot products (AVX-512 VNNI or AVX2); x in bf16 is already rounded
  to 8 bits, so this costs little more. On a CPU with AMX, from ``dense_min_rows()`` rows on
  (prefill), column chunks are dequantized to bf16 instead and multiplied with torch's GEMM
  (oneDNN on AMX tiles), which is faster there; without AMX the integer kernel is faster at every
  row count.

The ISA is decided once from the CPU (``kernel_isa``, for the start-up banner); the environment
variable ``TOKENMILL_QUANT_ISA`` (avx512_vnni | avx2 | reference) or ``set_isa`` forces a path,
e.g. to test the AVX2 kernels on an AVX-512 machine. When the extension cannot be built the
``reference`` path (dequantize, then a float32 matmul) serves every call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.layers.kernels.extension import NATIVE
from tokenmill.quant.weight import BLOCK, QuantizedWeight, dequantize

logger = logging.getLogger(__name__)

ISA_ENV = "TOKENMILL_QUANT_ISA"
ISAS = ("avx512_vnni", "avx2", "reference")
_ISA_CODES = {"avx2": 1, "avx512_vnni": 2}
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_ISA_NEEDS = {"avx512_vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "fma",
                              "f16c"},
              "avx2": {"avx2", "fma", "f16c"}}
TILE_N = 16  # output columns per tile: one AVX-512 register of int32 lanes
# On a CPU with AMX, from this many rows on, dequantize + torch's GEMM beats the int8 kernel
# (which is compute-bound from a few rows on). Measured on a Xeon with AMX, one core, 576 x 3072:
# 32 rows 450 vs 590 us, 48 rows about even, 64 rows 920 vs 730 us. Without AMX the int8 kernel
# wins at every row count: on a 2-core AMD EPYC (Zen 4, AVX-512 VNNI + BF16, no AMX), 2 threads,
# 576 x 3072, int8 vs dense bf16: 48 rows 304 vs 565 us, 256 rows 1605 vs 2163, 1024 rows 6762 vs
# 8659; 576 x 49152 at 1024 rows 138 vs 168 ms; the AVX2 kernel against the dense fp32 GEMM: 256
# rows 2692 vs 5699 us (benchmarks/quant_matmul_micro.py --paths).
DENSE_MIN_ROWS_AMX = 48
# float32 x: from this many rows on, dequantize + torch's float32 GEMM beats the exact kernel.
# Measured on the same Xeon (AMX), one core, K=576 N=576/960/3072 and K=1536 N=576, q4 g32 with
# mins: at 16 rows the exact kernel wins everywhere (86 vs 97 us at 576 x 576, 432 vs 537 at
# 576 x 3072), at 24 it is even (654 vs 655 at 576 x 3072; 125 vs 119 at 576 x 576), at 32 the
# GEMM wins or ties (405 vs 475 at 1536 x 576) (benchmarks/quant_matmul_micro.py --exact).
DENSE_MIN_ROWS_FP32 = 24
# Columns dequantized per GEMM call on the dense path: the chunk stays in L2 for the GEMM.
DENSE_CHUNK_BYTES = 1 << 20

_module: Any = None
_isa: str | None = None
_features: frozenset[str] = frozenset()


def quant_matmul_module() -> Any | None:
    """The compiled extension, or None when it cannot be built here (then: reference path)."""
    global _module, _features
    if _module is None:  # once built, NATIVE.module() is a field read; a failed build stays None
        _module = NATIVE.module()
        if _module is not None:
            _features = frozenset(_module.cpu_features())
    return _module


def _supported(isa: str) -> bool:
    if isa == "reference":
        return True
    return quant_matmul_module() is not None and _ISA_NEEDS[isa] <= _features


def _detect_isa() -> str:
    requested = os.environ.get(ISA_ENV, "").strip().lower()
    if requested:
        if requested not in ISAS:
            raise ValueError(f"{ISA_ENV}={requested!r}: expected one of {', '.join(ISAS)}")
        if _supported(requested):
            return requested
        logger.warning("%s=%s is not supported on this machine; detecting instead", ISA_ENV,
                       requested)
    for isa in ISAS:
        if _supported(isa):
            return isa
    return "reference"


def kernel_isa() -> str:
    """The path quantized linears take here: "avx512_vnni" | "avx2" | "reference"."""
    global _isa
    if _isa is None:
        _isa = _detect_isa()
        logger.info("quantized matmul kernel: %s", _isa)
    return _isa


def isa_code() -> int:
    """``kernel_isa()`` as the native code takes it: 2 AVX-512 VNNI, 1 AVX2, 0 reference."""
    return _ISA_CODES.get(_isa or kernel_isa(), 0)


def set_isa(name: str | None) -> str:
    """Force a path (None: decide again from the environment and the CPU); returns the path taken.

    Raises ValueError for an unknown name or a path this CPU cannot run."""
    global _isa
    if name is None:
        _isa = None
        return kernel_isa()
    if name not in ISAS:
        raise ValueError(f"unknown quantized matmul ISA {name!r}: expected one of {', '.join(ISAS)}")
    if not _supported(name):
        raise ValueError(f"quantized matmul ISA {name!r} is not supported on this machine")
    _isa = name
    return name


def dense_min_rows() -> int | None:
    """Rows of bf16 x from which ``quant_linear`` takes the dense path; None: never (no AMX)."""
    quant_matmul_module()
    return DENSE_MIN_ROWS_AMX if "amx-bf16" in _features else None


def _dense_dtype(isa: str) -> torch.dtype:
    # bf16 GEMM only pays where the CPU has bf16 dot products; elsewhere fp32 is faster.
    if isa == "avx512_vnni" and _features & {"avx512bf16", "amx-bf16"}:
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class PackedLinear:
    """One ``QuantizedWeight`` in the native kernel's layout (see quant_matmul.cpp).

    ``data`` is a flat uint8 buffer of ``num_tiles`` records of ``tile_stride`` bytes; for the
    reference path (no native kernel) it is empty and ``reference`` holds the weight itself."""

    out_features: int
    in_features: int
    bits: int
    group_size: int
    has_min: bool
    data: torch.Tensor
    tile_stride: int
    scales_offset: int
    mins_offset: int
    input_perm: torch.Tensor | None
    source: str = ""
    reference: QuantizedWeight | None = None

    @property
    def num_tiles(self) -> int:
        return -(-self.out_features // TILE_N)

    def nbytes(self) -> int:
        if self.reference is not None:
            return self.reference.nbytes()
        return self.data.numel()

    @property
    def args(self) -> tuple:
        """The layout as the extension's functions take it (built once: decode calls are µs)."""
        cached = self.__dict__.get("_args")
        if cached is None:
            cached = (self.data, self.out_features, self.in_features, self.bits, self.group_size,
                      self.has_min, self.tile_stride, self.scales_offset, self.mins_offset,
                      self.input_perm)
            object.__setattr__(self, "_args", cached)
        return cached


def _tile_major(groups: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """[N_padded, G] float16 -> [num_tiles, G * 16 * 2] bytes, ordered (tile, group, column)."""
    g = groups.shape[1]
    return (groups.view(num_tiles, TILE_N, g).transpose(1, 2).contiguous()
            .view(torch.uint8).reshape(num_tiles, g * TILE_N * 2))


def pack(weight: QuantizedWeight) -> PackedLinear:
    """Repack ``weight`` (losslessly) for the path ``kernel_isa()`` picked."""
    weight.validate(weight.source or "quantized weight")
    n, k = weight.shape
    perm = None if weight.input_perm is None else weight.input_perm.to(torch.int64).contiguous()
    if kernel_isa() == "reference":
        return PackedLinear(n, k, weight.bits, weight.group_size, weight.mins is not None,
                            torch.empty(0, dtype=torch.uint8), 0, 0, 0, perm, weight.source,
                            reference=weight)
    num_tiles = -(-n // TILE_N)
    pad = num_tiles * TILE_N - n
    blocks = k // BLOCK
    codes = weight.codes()
    if weight.bits == 8:
        codes = codes + 128  # unsigned for the u8 side of dpbusd; the kernel subtracts 128*sum(x)
    codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    codes = codes.view(num_tiles, TILE_N, blocks, BLOCK)
    if weight.bits == 4:
        # byte (j, c, i) of a block: k = 4j+i in the low nibble, k = 16+4j+i in the high one
        low = codes[..., :16].reshape(num_tiles, TILE_N, blocks, 4, 4)
        high = codes[..., 16:].reshape(num_tiles, TILE_N, blocks, 4, 4)
        codes = low | (high << 4)
    else:
        codes = codes.reshape(num_tiles, TILE_N, blocks, 8, 4)
    pieces = [codes.permute(0, 2, 3, 1, 4).reshape(num_tiles, -1)]  # (tile, block, j, column, i)
    scales_offset = pieces[0].shape[1]
    pieces.append(_tile_major(torch.nn.functional.pad(weight.scales.to(torch.float16),
                                                      (0, 0, 0, pad)), num_tiles))
    mins_offset = scales_offset + pieces[1].shape[1]
    if weight.mins is not None:
        pieces.append(_tile_major(torch.nn.functional.pad(weight.mins.to(torch.float16),
                                                          (0, 0, 0, pad)), num_tiles))
    used = sum(piece.shape[1] for piece in pieces)
    tile_stride = -(-used // 64) * 64  # each tile starts on a cache line
    pieces.append(torch.zeros(num_tiles, tile_stride - used, dtype=torch.uint8))
    data = torch.cat(pieces, dim=1).reshape(-1)
    return PackedLinear(n, k, weight.bits, weight.group_size, weight.mins is not None, data,
                        tile_stride, scales_offset, mins_offset, perm, weight.source)


def unpack(packed: PackedLinear, tile_ids: torch.Tensor | None = None) -> QuantizedWeight:
    """The ``QuantizedWeight`` that ``packed`` was built from (the repack is lossless); with
    ``tile_ids``, only those tiles' rows (16 each, the last tile's padding included)."""
    if packed.reference is not None:
        if tile_ids is None:
            return packed.reference
        rows = (tile_ids.unsqueeze(1) * TILE_N + torch.arange(TILE_N)).reshape(-1)
        return packed.reference.select_rows(rows.clamp(max=packed.out_features - 1))
    k, t = packed.in_features, packed.num_tiles
    blocks, groups = k // BLOCK, k // packed.group_size
    records = packed.data.view(t, packed.tile_stride)
    n = packed.out_features
    if tile_ids is not None:
        records, t = records[tile_ids], len(tile_ids)
        n = t * TILE_N
    codes = records[:, :packed.scales_offset]
    if packed.bits == 4:
        codes = codes.reshape(t, blocks, 4, TILE_N, 4).permute(0, 3, 1, 2, 4)
        codes = torch.cat((codes & 0x0F, codes >> 4), dim=-2)  # [t, c, b, (half j), i]
        codes = codes.reshape(t * TILE_N, k)[:n]
        qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    else:
        codes = codes.reshape(t, blocks, 8, TILE_N, 4).permute(0, 3, 1, 2, 4)
        qweight = (codes.reshape(t * TILE_N, k)[:n].to(torch.int16) - 128).to(torch.int8)

    def groups_of(offset: int) -> torch.Tensor:
        part = records[:, offset:offset + groups * TILE_N * 2].contiguous().view(torch.float16)
        return part.view(t, groups, TILE_N).transpose(1, 2).reshape(t * TILE_N, groups)[:n]

    scales = groups_of(packed.scales_offset).contiguous()
    mins = groups_of(packed.mins_offset).contiguous() if packed.has_min else None
    return QuantizedWeight(packed.bits, packed.group_size, qweight, scales, mins,
                           packed.input_perm, packed.source)


def dequantize_packed_rows(packed: PackedLinear, rows: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    """``W[rows]`` in ``dtype``, read from the kernel's layout: the lookup of an embedding whose
    tied LM head owns the only copy of the matrix. Unpacks just the tiles that hold ``rows``."""
    flat = rows.reshape(-1).to(torch.int64)
    tile_ids, inverse = torch.unique(flat // TILE_N, return_inverse=True)
    local_rows = inverse * TILE_N + flat % TILE_N
    out = unpack(packed, tile_ids).dequantize_rows(local_rows, dtype)
    return out.view(*rows.shape, packed.in_features)


def reference_linear(x: torch.Tensor, packed: PackedLinear,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize, then a float32 matmul (``reference_matmul``), cast to ``x.dtype``."""
    y = x.float() @ dequantize(unpack(packed), torch.float32).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quant_linear(x: torch.Tensor, packed: PackedLinear,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` [..., K] float32 or bfloat16; the result has x's dtype."""
    if x.dim() != 2:
        y = quant_linear(x.reshape(-1, x.shape[-1]), packed, bias)
        return y.view(*x.shape[:-1], packed.out_features)
    if x.shape[1] != packed.in_features:
        raise ValueError(f"quant_linear: x has {x.shape[1]} features, the weight takes "
                         f"{packed.in_features}")
    isa = _isa or kernel_isa()
    if isa == "reference" or packed.reference is not None or x.dtype not in _NATIVE_DTYPES:
        return reference_linear(x, packed, bias)
    if x.dtype == torch.float32:
        path = "dense" if x.shape[0] >= DENSE_MIN_ROWS_FP32 else "exact"
    else:
        dense_from = dense_min_rows()
        path = "dense" if dense_from is not None and x.shape[0] >= dense_from else "int8"
    return native_linear(x, packed, bias, path, isa)


def native_linear(x: torch.Tensor, packed: PackedLinear, bias: torch.Tensor | None, path: str,
                  isa: str | None = None) -> torch.Tensor:
    """One native path by name, for any row count: "exact" (float32 x only), "int8" or "dense"
    (tests and benchmarks; ``quant_linear`` picks the path). ``x`` is 2-D."""
    isa = isa or _isa or kernel_isa()
    if path == "dense":
        # float32 x is multiplied in float32: rounding it to bf16 would break the exact mode
        dtype = torch.float32 if x.dtype == torch.float32 else _dense_dtype(isa)
        elt = 2 if dtype == torch.bfloat16 else 4
        chunk = max(TILE_N, DENSE_CHUNK_BYTES // (packed.in_features * elt) // TILE_N * TILE_N)
        return _module.dense_linear(x, *packed.args, bias, dtype, chunk, _ISA_CODES[isa])
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    if path == "exact":
        return _module.exact_linear(x, *packed.args, bias, _ISA_CODES[isa])
    if path != "int8":
        raise ValueError(f"unknown quantized matmul path {path!r}")
    return _module.int8_linear(x, *packed.args, bias, _ISA_CODES[isa])
