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

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENABLE_ENV = "TOKENMILL_FUSED_OPS"

_lock = threading.Lock()
_module: Any = None
_failed = False
_enabled = os.environ.get(ENABLE_ENV, "1") != "0"


def _build() -> Any:
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).with_name("fused_ops.cpp")
            # -ffp-contract=off: no fused multiply-adds, so float32 results round like the
            # PyTorch path's separate multiply and add.
            _module = load(name="tokenmill_fused_ops", sources=[str(source)],
                           extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off",
                                         "-fno-math-errno", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 -- no compiler, no ninja, unsupported platform
            _failed = True
            _module = None
            logger.warning("native fused ops unavailable (%s); using the PyTorch path", exc)
        return _module


def fused_ops_module() -> Any | None:
    """The compiled module when fused ops are on and it builds here, else None (PyTorch path)."""
    if not _enabled:
        return None
    if _module is not None or _failed:  # the hot path: no lock once decided
        return _module
    return _build()


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
