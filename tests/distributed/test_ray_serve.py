"""Ray Serve end to end (``tokenmill serve --ray``'s application), under the networking rule: the
cases in ``ray_serve_cases.py`` run in a child pytest inside a fresh network namespace where only
``lo`` exists (``unshare -n``, then ``ip link set lo up``), so Ray cannot pick or reach any address
but 127.0.0.1. Needs root (as CI runs) and the ray extra; skipped otherwise, saying why.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("ray_serve_cases.py")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason="ray is not installed (pip install 'tokenmill[ray]')"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                       reason="needs root with unshare and ip for a fresh network namespace"),
]


def test_ray_serve_cases_in_a_fresh_network_namespace():
    env = {**os.environ, "TOKENMILL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(
               p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    command = ["unshare", "-n", "sh", "-c",
               'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider -x "$1"',
               sys.executable, str(CASES)]
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=540)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
