"""Fused native CPU ops for a decoder layer's small element-wise steps (``fused_ops.cpp``).

At decode a row is one token, so RMSNorm (6 torch ops), rotary (12) and SiLU-and-mul (3) cost their
per-op dispatch, not their arithmetic; one native call each (and one for "add the residual, then
normalize") removes most of a layer's small ops. ``norm.py``, ``rotary.py`` and ``activation.py``
call ``fused_ops_module()`` and keep their PyTorch code as the reference path, used when this
returns None: the extension failed to build, it is switched off (``TOKENMILL_FUSED_OPS=0`` or
``set_enabled(False)``), or the tensors are not on the CPU (``usable``). Inference only: the
native ops do not record autograd.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tokenmill.layers.kernels.extension import native_module

ENABLE_ENV = "TOKENMILL_FUSED_OPS"

_enabled = os.environ.get(ENABLE_ENV, "1") != "0"
def fused_ops_module() -> Any | None:
    """The compiled module when fused ops are on and it builds here, else None (PyTorch path)."""
    if not _enabled:
        return None
    return native_module()


def usable(x: torch.Tensor) -> Any | None:
    """The module if ``x`` may go through it (CPU tensors only), else None."""
    if not _enabled or x.device.type != "cpu":
        return None
    return fused_ops_module()


def set_enabled(enabled: bool) -> None:
    """Switch the fused ops on or off for the whole process (tests, benchmarks)."""
    global _enabled
    _enabled = enabled


def is_enabled() -> bool:
    return _enabled


def describe() -> str:
    """For the start-up banner: "native", "off" or "unavailable (PyTorch path)"."""
    if not _enabled:
        return "off"
    return "native" if fused_ops_module() is not None else "unavailable (PyTorch path)"
