"""Importing tokenmill bounds oneDNN's and ideep's per-shape caches, unless the user set them."""

from __future__ import annotations

import os
import subprocess
import sys

PRINT = ("import tokenmill, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], "
         "os.environ['LRU_CACHE_CAPACITY'])")


def _run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    return subprocess.run([sys.executable, "-c", PRINT], env={**clean, **env}, check=True,
                          capture_output=True, text=True).stdout.split()


def test_defaults_are_bounded_and_a_users_value_wins() -> None:
    assert _run() == ["64", "64"]
    assert _run(LRU_CACHE_CAPACITY="1024") == ["64", "1024"]
