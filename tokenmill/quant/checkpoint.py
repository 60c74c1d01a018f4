"""Pre-quantized safetensors checkpoints: gather each layer's parts into one weight object.

A GPTQ, AWQ or FP8 checkpoint stores a quantized linear layer as several tensors under one prefix
(``<prefix>.qweight``, ``.qzeros``, ``.scales``, ...). ``wrap_checkpoint_tensors`` sits between the
safetensors reader and the model: it holds a layer's parts until they are all there, then yields one
``(<prefix>.weight, QuantizedWeight | Fp8Weight)`` pair, so models keep seeing one weight per layer
and know nothing about the format (DESIGN habit 7). Every other tensor passes through unchanged.

Parts arrive in file order (sorted names, possibly split over shard files), so a layer is converted
as soon as all its parts are in; a layer still lacking an optional part (GPTQ's ``g_idx``) is
converted at the end of the stream, and one lacking a required part is an error naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from tokenmill.errors import CorruptModelFileError, ModelLoadError, UnsupportedModelError

SUPPORTED_QUANT_METHODS = ("gptq", "awq", "fp8", "compressed-tensors")


class CheckpointFormat(Protocol):
    name: str
    required_parts: frozenset[str]
    optional_parts: frozenset[str]
    dropped_parts: frozenset[str]  # tensors tokenmill has no use for (activation scales)

    def is_part(self, part: str, tensor: torch.Tensor) -> bool:
        """Whether ``<prefix>.<part>`` belongs to a quantized layer (else it passes through)."""

    def convert(self, prefix: str, parts: dict[str, torch.Tensor]) -> Any:
        """One layer's parts as the weight object the linear layer computes with."""


def checkpoint_format(quantization_config: dict[str, Any] | None,
                      where: Path | str) -> CheckpointFormat | None:
    """The reader for a ``quantization_config`` (None: a plain checkpoint). Raises
    ``UnsupportedModelError`` naming ``where`` and the setting tokenmill cannot read."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "gptq":
        from tokenmill.quant.gptq import GptqFormat

        return GptqFormat.from_config(quantization_config, where)
    if method == "awq":
        from tokenmill.quant.awq import AwqFormat

        return AwqFormat.from_config(quantization_config, where)
    if method in ("fp8", "compressed-tensors"):
        from tokenmill.quant.fp8 import Fp8CheckpointFormat

        return Fp8CheckpointFormat.from_config(quantization_config, where)
    raise UnsupportedModelError(f"{where}: quantization_config quant_method={method!r} is not "
                                f"supported (tokenmill reads {', '.join(SUPPORTED_QUANT_METHODS)})")


def wrap_checkpoint_tensors(stream: Iterator[tuple[str, torch.Tensor]],
                            quantization_config: dict[str, Any] | None,
                            path: Path | str) -> Iterator[tuple[str, Any]]:
    """``stream`` with each quantized layer's parts replaced by one ``<prefix>.weight`` entry."""
    fmt = checkpoint_format(quantization_config, path)
    if fmt is None:
        yield from stream
        return
    try:
        yield from _gather_layers(stream, fmt)
    except ModelLoadError as exc:
        if str(path) in exc.message:
            raise
        raise type(exc)(f"{path}: {exc.message}") from exc


def _gather_layers(stream: Iterator[tuple[str, torch.Tensor]],
                   fmt: CheckpointFormat) -> Iterator[tuple[str, Any]]:
    complete = fmt.required_parts | fmt.optional_parts
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in stream:
        prefix, _, part = name.rpartition(".")
        if part in fmt.dropped_parts:
            continue
        try:
            is_part = fmt.is_part(part, tensor)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{name}: {exc.message}") from exc
        if not is_part:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        if part in parts:
            raise CorruptModelFileError(f"{name} appears twice in the checkpoint")
        parts[part] = tensor
        if complete <= parts.keys():
            yield f"{prefix}.weight", fmt.convert(prefix, pending.pop(prefix))
    for prefix, parts in pending.items():
        missing = sorted(fmt.required_parts - parts.keys())
        if missing:
            raise CorruptModelFileError(
                f"{prefix}.{missing[0]} is missing: a {fmt.name} layer needs "
                f"{', '.join(sorted(fmt.required_parts))}; the checkpoint has "
                f"{', '.join(sorted(parts))}")
        yield f"{prefix}.weight", fmt.convert(prefix, parts)
