"""``QuantizedWeight``: the one in-memory form of a weight-only quantized matrix.

Every quantized source (GGUF blocks, GPTQ/AWQ ``qweight``/``qzeros``/``scales``, tokenmill's own INT8 and
INT4 quantizers) is converted into this form by a method in ``tokenmill.quant``; the linear layer and the
native kernel only ever see it, so models and loaders stay format-agnostic.

A matrix ``W`` of shape ``[N, K]`` (``N`` output rows, ``K`` inputs, as ``nn.Linear`` stores it) is cut
along ``K`` into groups of ``group_size`` consecutive inputs. Each ``(row, group)`` has a scale and an
optional offset, and each element an integer code ``q``::

    W[n, k] = scales[n, k // group_size] * q[n, k] + mins[n, k // group_size]   (mins == 0 when None)

* ``bits == 8``: ``qweight`` is int8 ``[N, K]`` holding ``q`` in -128..127.
* ``bits == 4``: ``qweight`` is uint8 ``[N, K // 2]``; element ``k`` lives in byte ``k // 2``, the low
  nibble for even ``k`` and the high nibble for odd ``k``; ``q`` is 0..15 (signed 4-bit codes such as
  GGUF Q4_0's ``q - 8`` are expressed through ``mins = -8 * scale``).
* ``scales`` / ``mins`` are float16 ``[N, K // group_size]``. float16 holds GGUF's Q8_0/Q4_0/Q4_1 block
  scales exactly (the file stores them as float16), and halves the bytes a decode step reads for them.
* ``group_size`` is a multiple of 32 that divides ``K`` (the kernels work on 32-element blocks).
* ``input_perm`` (int64 ``[K]`` or None): the layer computes ``x[:, input_perm] @ W.T``; GPTQ's
  ``desc_act`` checkpoints order their groups by ``g_idx``, and permuting the columns once at load makes
  each group contiguous again (a lossless gather).

``dequantize`` and ``reference_matmul`` are the plain PyTorch definitions every kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32  # kernels consume K in blocks of this many elements


@dataclass
class QuantizedWeight:
    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    input_perm: torch.Tensor | None = None
    # Where this came from, for the start-up report and error messages ("gguf:Q4_1", "int8", "gptq").
    source: str = ""

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def nbytes(self) -> int:
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.mins is not None:
            total += self.mins.numel() * self.mins.element_size()
        return total

    def validate(self, name: str) -> None:
        """Raise ValueError naming ``name`` when the parts do not fit together."""
        n, k = self.shape
        expected_dtype = torch.int8 if self.bits == 8 else torch.uint8
        if self.bits not in (4, 8):
            raise ValueError(f"{name}: {self.bits}-bit weights are not supported (4 or 8)")
        if self.qweight.dtype != expected_dtype or self.qweight.dim() != 2:
            raise ValueError(f"{name}: qweight must be a 2-D {expected_dtype} tensor, got "
                             f"{self.qweight.dtype} {tuple(self.qweight.shape)}")
        if self.group_size % BLOCK or k % self.group_size:
            raise ValueError(f"{name}: group size {self.group_size} must be a multiple of {BLOCK} "
                             f"dividing the {k} inputs")
        groups = (n, k // self.group_size)
        for part, tensor in (("scales", self.scales), ("mins", self.mins)):
            if tensor is not None and tuple(tensor.shape) != groups:
                raise ValueError(f"{name}: {part} has shape {tuple(tensor.shape)}, expected "
                                 f"{groups}")
        if self.input_perm is not None and tuple(self.input_perm.shape) != (k,):
            raise ValueError(f"{name}: input_perm has shape {tuple(self.input_perm.shape)}, "
                             f"expected ({k},)")

    def codes(self) -> torch.Tensor:
        """The integer codes ``q`` as int16 ``[N, K]``."""
        if self.bits == 8:
            return self.qweight.to(torch.int16)
        low = (self.qweight & 0x0F).to(torch.int16)
        high = (self.qweight >> 4).to(torch.int16)
        return torch.stack((low, high), dim=-1).reshape(self.out_features, self.in_features)

    def dequantize_rows(self, rows: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W[rows]`` (all rows when None) in ``dtype``: the embedding lookup of a tied matrix."""
        part = self if rows is None else self.select_rows(rows)
        groups = part.scales.shape[1]
        q = part.codes().to(torch.float32).view(-1, groups, part.group_size)
        w = q * part.scales.float().unsqueeze(-1)
        if part.mins is not None:
            w = w + part.mins.float().unsqueeze(-1)
        return w.reshape(-1, part.in_features).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def can_concat(self, other: QuantizedWeight) -> bool:
        return (self.bits == other.bits and self.group_size == other.group_size
                and (self.mins is None) == (other.mins is None)
                and self.in_features == other.in_features
                # GPTQ's desc_act gives layers that read the same input the same order
                and _same_perm(self.input_perm, other.input_perm))

    def select_rows(self, rows: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(self.bits, self.group_size, self.qweight[rows], self.scales[rows],
                               None if self.mins is None else self.mins[rows], self.input_perm,
                               self.source)


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[N, K]`` matrix the layer multiplies by (``input_perm`` undone, so that
    ``x @ dequantize(w).T`` is the layer's output for unpermuted ``x``)."""
    dense = weight.dequantize_rows(None, dtype)
    if weight.input_perm is None:
        return dense
    out = torch.empty_like(dense)
    out[:, weight.input_perm] = dense
    return out


def reference_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """``x @ W.T`` in float32: what every kernel must reproduce within its stated tolerance."""
    return x.float() @ dequantize(weight, torch.float32).T


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack the output rows of compatible weights (``can_concat``): fused q/k/v and gate/up."""
    first = parts[0]
    mins = None if first.mins is None else torch.cat([p.mins for p in parts])
    source = "+".join(dict.fromkeys(p.source for p in parts))  # "gguf:Q4_K+gguf:Q6_K" if mixed
    return QuantizedWeight(first.bits, first.group_size, torch.cat([p.qweight for p in parts]),
                           torch.cat([p.scales for p in parts]), mins, first.input_perm, source)


def widened_to_match(parts: list[QuantizedWeight]) -> list[QuantizedWeight] | None:
    """``parts`` that differ only in bit width or in having offsets, each rewritten losslessly as
    8-bit codes (with zero offsets where another part has them) so that they can be fused: a
    GGUF file may store q and k as Q4_K and v as Q6_K. None when they differ in anything else."""
    first = parts[0]
    if any(p.group_size != first.group_size or p.in_features != first.in_features
           or not _same_perm(p.input_perm, first.input_perm) for p in parts[1:]):
        return None
    with_mins = any(p.mins is not None for p in parts)
    widened = []
    for part in parts:
        qweight = part.codes().to(torch.int8) if part.bits == 4 else part.qweight
        mins = part.mins
        if with_mins and mins is None:
            mins = torch.zeros_like(part.scales, dtype=torch.float16)
        widened.append(QuantizedWeight(8, part.group_size, qweight, part.scales, mins,
                                       part.input_perm, part.source))
    return widened


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)
