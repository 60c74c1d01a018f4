"""A real headless browser for the dashboard tests: Debian's Chromium driven by Playwright.

Playwright never downloads a browser here (no ``playwright install``): it launches
``/usr/bin/chromium`` from the Debian package, which ``make test`` installs when it runs as root.
Without it the tests skip and say how to get it. Every console error, uncaught page error and
failed request is recorded, so a test can assert there were none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TOKENMILL_TEST_ARTIFACTS", REPO / "test-artifacts"))
"""Where screenshots go (git-ignored); override with TOKENMILL_TEST_ARTIFACTS."""


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed; `apt-get install -y chromium` (make "
                    "test does it when run as root)")
    return path


@dataclass
class PageProblems:
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return [*self.console_errors, *self.page_errors, *self.failed_requests]


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1100) -> Iterator[tuple[Any, PageProblems]]:
    """A fresh page in headless Chromium, with what went wrong on it collected as it happens."""
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    problems = PageProblems()
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: m.type == "error" and problems.console_errors.append(
                f"console: {m.text}"))
            page.on("pageerror", lambda e: problems.page_errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.failed_requests.append(
                f"request failed: {r.url} ({r.failure})"))
            page.on("response", lambda r: r.status >= 400 and problems.failed_requests.append(
                f"HTTP {r.status}: {r.url}"))
            yield page, problems
        finally:
            browser.close()


def save_screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot of {page.url} saved to {path}")
    return path
