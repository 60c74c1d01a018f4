"""Give the memory freed while loading a model back to the operating system.

Loading parses the checkpoint's metadata (hundreds of thousands of small objects for a GGUF
vocabulary) and builds packed weights through temporaries; glibc keeps what they freed in the
process's heap, where it counts as resident memory for the life of the server. ``malloc_trim``
returns the free parts (measured on the built-in model: about 40 MB). Elsewhere than glibc it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)


def release_free_heap() -> bool:
    """True when glibc's ``malloc_trim`` ran."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
