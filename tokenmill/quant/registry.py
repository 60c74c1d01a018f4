"""``--quantization`` names -> the method that prepares each linear layer's weight at load.

A method's ``prepare`` receives one layer's weight as the loader produced it (a dense tensor, a
``QuantizedWeight`` from GGUF blocks or a GPTQ/AWQ checkpoint, or an ``Fp8Weight``) and returns what the
layer will compute with. ``auto`` keeps whatever the checkpoint holds; ``none`` dequantizes everything;
``int8`` / ``int4`` / ``fp8`` quantize at load (an already-quantized checkpoint is dequantized first, so any
method applies to any model). Methods live one per file and register themselves here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from tokenmill.errors import ConfigError

QUANTIZATION_METHODS = ("auto", "none", "int8", "int4", "fp8")
GROUP_SIZES = (32, 64, 128)


class QuantMethod(Protocol):
    name: str

    def prepare(self, name: str, weight: Any, dtype: torch.dtype) -> Any:
        """The weight the layer ``name`` computes with (dense tensor or a quantized form)."""


_FACTORIES: dict[str, Callable[[int], QuantMethod]] = {}


def register(name: str) -> Callable[[Callable[[int], QuantMethod]], Callable[[int], QuantMethod]]:
    def decorate(factory: Callable[[int], QuantMethod]) -> Callable[[int], QuantMethod]:
        _FACTORIES[name] = factory
        return factory
    return decorate


def get_quant_method(name: str, group_size: int = 32) -> QuantMethod:
    if name not in QUANTIZATION_METHODS:
        raise ConfigError(f"quantization={name!r} is not one of {', '.join(QUANTIZATION_METHODS)}",
                          param="quantization")
    # the method modules register themselves on import
    import importlib

    module = {"auto": "passthrough", "none": "passthrough"}.get(name, name)
    importlib.import_module(f"tokenmill.quant.{module}")

    return _FACTORIES[name](group_size)


def to_dense(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """Any weight form as a dense ``[N, K]`` tensor in ``dtype``."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype)
    return weight.dequantize(dtype)
