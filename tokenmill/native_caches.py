"""Bounds on the per-shape caches inside torch's oneDNN (mkldnn) path, set before torch starts.

oneDNN keeps a primitive for every distinct matmul shape it has run (``ONEDNN_PRIMITIVE_CACHE_
CAPACITY``), and ideep, torch's wrapper, keeps its own (``LRU_CACHE_CAPACITY``); both default to
1024 entries. A server sees a new prefill shape (rows = tokens in the step) with almost every
request, so at those defaults resident memory climbed ~50 MiB per 30 new prompts and took hundreds
of MiB to level off (``benchmarks/engine_rss_rounds.py``, found by the soak). One step has a
handful of distinct GEMM shapes, reused by every layer, so 64 entries keep every hit that matters
(a miss costs one primitive creation per shape per step) and RSS flat after warm-up. A value the
user already set wins.
"""

from __future__ import annotations

import os

CACHE_CAPACITY = "64"
_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_native_caches() -> None:
    for name in _VARIABLES:
        os.environ.setdefault(name, CACHE_CAPACITY)
