"""Build the native kernels once per process (torch's C++ extension builder, gcc + ninja), or say once
why they could not be built so callers fall back to their PyTorch paths.

All kernels are one extension, ``tokenmill_native`` (native.h lists its files): the decoder stack
chains the quantized matmul, the fused ops and the attention kernel in C++, so they must link
together. The build is cached per machine under ``TORCH_EXTENSIONS_DIR`` (ninja rebuilds only the
files that changed); a later process only loads it. ``-march=native``: the build is per machine,
so each file may use what this CPU has (the quantized matmul still carries AVX-512 and AVX2
kernels behind function-level target pragmas, chosen at run time, so tests can force either).
``-ffp-contract=off``: no fused multiply-adds the source did not ask for, so the fused ops round
like their PyTorch reference paths.

Concurrent builds: torch guards a build directory with a "baton", a plain ``lock`` file that a
waiting process polls for ever. A builder that is killed mid-build (a test server stopped by its
fixture, a session ended by a signal) leaves the file behind, and every later process, a CI run
included, then hangs on its first kernel call. So builders here first take an ``flock`` on
``<build dir>.flock``, which the kernel releases when its holder dies; whoever holds it is the only
tokenmill builder alive, so a baton file it finds is stale and is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class NativeExtension:
    def __init__(self, name: str, sources: list[str], cflags: list[str], what: str):
        self.name = name
        self.sources = [Path(__file__).with_name(source) for source in sources]
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

            build_directory = extension_build_directory(self.name)
            with exclusive_build(build_directory):
                # -fopenmp makes at::parallel_for use torch's own OpenMP pool
                self._module = load(name=self.name, sources=[str(source) for source in self.sources],
                                    extra_cflags=[*self.cflags, "-fopenmp"],
                                    extra_ldflags=["-fopenmp"], build_directory=str(build_directory),
                                    verbose=False)
        except Exception as exc:  # no compiler, no ninja, unsupported platform ...
            self._failed = True
            self._module = None
            text = str(exc).strip()
            logger.warning("%s unavailable (%s); using the PyTorch path", self.what,
                           text.splitlines()[0] if text else repr(exc))
            logger.debug("%s build failure", self.what, exc_info=exc)


def extension_build_directory(name: str) -> Path:
    """Where the extension is built: under ``TORCH_EXTENSIONS_DIR`` if set, else torch's per-user
    cache, one folder per Python version (these kernels are CPU-only) and per checkout."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_cpu")
    # One folder per checkout: torch's build files name the sources by absolute path, so two
    # checkouts (a clone and a worktree, say) sharing one folder would each rebuild over the
    # other's build, taking turns on the lock.
    checkout = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:10]
    directory = Path(root) / f"{name}-{checkout}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextmanager
def exclusive_build(build_directory: Path) -> Iterator[None]:
    """Hold an flock for the build; while held, a leftover torch baton file is stale."""
    with open(build_directory.with_name(build_directory.name + ".flock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # waits only for a builder that is alive
        try:
            stale_baton = build_directory / "lock"
            if stale_baton.exists():
                logger.warning("removing %s left by a build that did not finish", stale_baton)
                stale_baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


NATIVE = NativeExtension(
    "tokenmill_native",
    ["bindings.cpp", "quant_matmul.cpp", "quant_matmul_avx512.cpp", "quant_matmul_avx2.cpp",
     "fused_ops.cpp", "paged_attention.cpp", "decoder_stack.cpp"],
    ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fno-math-errno"],
    "native CPU kernels")


def native_module() -> Any | None:
    """The compiled kernels, or None when they cannot be built here."""
    return NATIVE.module()
