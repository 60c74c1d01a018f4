"""Build a native kernel once per process (torch's C++ extension builder, gcc + ninja), or say once
why it could not be built so callers fall back to their PyTorch path.

The build is cached per machine under ``TORCH_EXTENSIONS_DIR``; a later process only loads it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class NativeExtension:
    def __init__(self, name: str, source: str, cflags: list[str], what: str):
        self.name = name
        self.source = Path(__file__).with_name(source)
        self.cflags = cflags
        self.what = what  # for the warning: "native paged attention"
        self._lock = threading.Lock()
        self._module: Any = None
        self._failed = False

    @property
    def decided(self) -> bool:
        return self._module is not None or self._failed

    def module(self) -> Any | None:
        """The compiled module, or None when it cannot be built here."""
        if self.decided:  # the hot path: no lock once decided
            return self._module
        with self._lock:
            if not self.decided:
                self._build()
            return self._module

    def _build(self) -> None:
        try:
            from torch.utils.cpp_extension import load

            # -fopenmp makes at::parallel_for use torch's own OpenMP pool
            self._module = load(name=self.name, sources=[str(self.source)],
                                extra_cflags=[*self.cflags, "-fopenmp"],
                                extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # no compiler, no ninja, unsupported platform ...
            self._failed = True
            self._module = None
            text = str(exc).strip()
            logger.warning("%s unavailable (%s); using the PyTorch path", self.what,
                           text.splitlines()[0] if text else repr(exc))
            logger.debug("%s build failure", self.what, exc_info=exc)
