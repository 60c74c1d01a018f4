"""GPTQ 4-bit checkpoints (AutoGPTQ, GPTQModel, transformers) -> ``QuantizedWeight``.

Each quantized linear layer ``<prefix>`` is stored as

* ``qweight`` int32 ``[K / 8, N]``: eight codes per word along K (input ``8 * r + i`` in nibble
  ``i`` of row ``r``);
* ``qzeros`` int32 ``[G, N / 8]``: zero points packed the same way but along N;
* ``scales`` float16 ``[G, N]``;
* ``g_idx`` int32 ``[K]`` (may be absent when trivial): the group of each input. With ``desc_act``
  GPTQ quantized the inputs in activation order, so groups are scattered over K.

and ``w[n, k] = scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``. AutoGPTQ's original
format ("gptq", v1) stores ``zero - 1``; GPTQModel's "gptq_v2" stores the zero itself.

The conversion is lossless apart from rounding ``-scale * zero`` to float16 once: scattered groups
are made contiguous by sorting the inputs by group (``input_perm = argsort(g_idx)``), which the
layer undoes by gathering ``x[:, input_perm]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import CorruptModelFileError, UnsupportedModelError
from tokenmill.quant.int32_packing import (
    CODES_PER_WORD,
    expect_tensor,
    pack_codes,
    unpack_nibbles,
    zero_point_mins,
)
from tokenmill.quant.weight import BLOCK, QuantizedWeight

# checkpoint format -> what to add to a stored zero point to get the real one
_ZERO_OFFSETS = {"gptq": 1, "gptq_v1": 1, "gptq_v2": 0}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GptqFormat:
    """The settings of one GPTQ checkpoint that decide how its tensors are read."""

    group_size: int  # -1: one group over all of K
    desc_act: bool
    zero_offset: int
    name: str = "gptq"
    required_parts: frozenset[str] = frozenset({"qweight", "qzeros", "scales"})
    optional_parts: frozenset[str] = frozenset({"g_idx"})
    dropped_parts: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: dict[str, Any], where: Path | str) -> GptqFormat:
        bits = config.get("bits", 4)
        if bits != 4:
            raise UnsupportedModelError(f"{where}: quantization_config bits={bits} is not "
                                        "supported; tokenmill reads 4-bit GPTQ checkpoints")
        fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
        if fmt not in _ZERO_OFFSETS:
            raise UnsupportedModelError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported "
                                        f"(tokenmill reads {', '.join(_ZERO_OFFSETS)})")
        pack_dtype = str(config.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":  # GPTQModel can also pack into int8 / int16 words
            raise UnsupportedModelError(f"{where}: GPTQ pack_dtype={pack_dtype!r} is not "
                                        "supported (tokenmill reads int32 words)")
        group_size = int(config.get("group_size", 128))
        if group_size != -1 and (group_size <= 0 or group_size % BLOCK):
            raise UnsupportedModelError(f"{where}: quantization_config group_size={group_size} is "
                                        f"not supported (a multiple of {BLOCK}, or -1)")
        desc_act = bool(config.get("desc_act", False))
        required = cls.required_parts | ({"g_idx"} if desc_act else set())
        return cls(group_size, desc_act, _ZERO_OFFSETS[fmt], required_parts=frozenset(required))

    def is_part(self, part: str, tensor: torch.Tensor) -> bool:
        return part in self.required_parts or part in self.optional_parts

    def convert(self, prefix: str, parts: dict[str, torch.Tensor]) -> QuantizedWeight:
        return gptq_weight(prefix, parts, self.group_size, self.zero_offset)


def gptq_weight(prefix: str, parts: dict[str, torch.Tensor], group_size: int,
                zero_offset: int) -> QuantizedWeight:
    """One layer's ``qweight``/``qzeros``/``scales``/``g_idx`` as a ``QuantizedWeight``."""
    qweight = parts["qweight"]
    if qweight.dim() != 2:
        raise CorruptModelFileError(f"{prefix}.qweight has shape {tuple(qweight.shape)}, "
                                    "expected 2 dimensions (K / 8, N)")
    num_inputs, num_outputs = qweight.shape[0] * CODES_PER_WORD, qweight.shape[1]
    group = num_inputs if group_size == -1 else group_size
    if num_inputs % group or num_outputs % CODES_PER_WORD or group % BLOCK:
        raise UnsupportedModelError(
            f"{prefix}.qweight has shape {tuple(qweight.shape)}: {num_inputs} inputs must be a "
            f"whole number of groups of {group} (a multiple of {BLOCK}) and {num_outputs} outputs "
            f"a multiple of {CODES_PER_WORD}")
    num_groups = num_inputs // group
    expect_tensor(f"{prefix}.qweight", qweight, tuple(qweight.shape), (torch.int32,))
    expect_tensor(f"{prefix}.qzeros", parts["qzeros"], (num_groups, num_outputs // CODES_PER_WORD),
                  (torch.int32,))
    expect_tensor(f"{prefix}.scales", parts["scales"], (num_groups, num_outputs), SCALE_DTYPES)

    # qweight words run along K: unpack to [K / 8, N, 8], bring the nibble next to its word
    codes = unpack_nibbles(qweight).view(qweight.shape[0], num_outputs, CODES_PER_WORD)
    codes = codes.permute(1, 0, 2).reshape(num_outputs, num_inputs)  # [N, K]
    zeros = unpack_nibbles(parts["qzeros"]).to(torch.int16) + zero_offset  # [G, N]
    scales = parts["scales"].to(torch.float16).T.contiguous()  # [N, G]
    mins = zero_point_mins(scales, zeros.T)

    input_perm = _input_perm(prefix, parts.get("g_idx"), num_inputs, group)
    if input_perm is not None:
        codes = codes[:, input_perm]  # column j of the stored matrix is input input_perm[j]
    weight = QuantizedWeight(4, group, pack_codes(codes), scales, mins.contiguous(), input_perm,
                             "gptq")
    try:
        weight.validate(prefix)
    except ValueError as exc:  # the checks above should make this unreachable
        raise CorruptModelFileError(str(exc)) from exc
    return weight


def _input_perm(prefix: str, g_idx: torch.Tensor | None, num_inputs: int,
                group: int) -> torch.Tensor | None:
    """The gather that makes each group's inputs contiguous, or None when they already are."""
    if g_idx is None:
        return None
    expect_tensor(f"{prefix}.g_idx", g_idx, (num_inputs,), (torch.int32, torch.int64))
    g_idx = g_idx.to(torch.int64)
    trivial = torch.arange(num_inputs) // group
    if torch.equal(g_idx, trivial):
        return None
    num_groups = num_inputs // group
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
        raise CorruptModelFileError(f"{prefix}.g_idx holds groups {int(g_idx.min())}.."
                                    f"{int(g_idx.max())}, expected 0..{num_groups - 1}")
    counts = torch.bincount(g_idx, minlength=num_groups)
    if not bool((counts == group).all()):
        bad = int((counts != group).nonzero()[0])
        raise UnsupportedModelError(f"{prefix}.g_idx puts {int(counts[bad])} inputs in group "
                                    f"{bad}; tokenmill needs exactly {group} inputs per group")
    # stable, so inputs keep their order within a group (any order would do; this one is testable)
    return torch.argsort(g_idx, stable=True)
