"""Native CPU kernels, compiled on first use with torch's C++ extension builder (gcc + ninja).

PyTorch has no operator that attends through a block table without first gathering the blocks
into a new tensor; on a CPU that copy (plus reading it again) is most of a decode step's memory
traffic at large batch. The kernel here reads K/V in place. Building takes about a minute once per
machine (cached under ``TORCH_EXTENSIONS_DIR``); if it cannot be built the engine falls back to the
PyTorch path and says so once.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_module: Any = None
_failed = False


def paged_attention_module() -> Any | None:
    """The compiled module, or None when it cannot be built here."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).with_name("paged_attention.cpp")
            _module = load(name="tokenmill_paged_attention", sources=[str(source)],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # no compiler, no ninja, unsupported platform ...
            _failed = True
            logger.warning("native paged attention unavailable (%s); using the PyTorch path", exc)
        return _module
