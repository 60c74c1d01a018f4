"""The live dashboard pages (server and gateway): static HTML with inline CSS and JS.

Each page is one self-contained response: no build step, no CDN, no second fetch. What both pages
share (``charts.js``: SVG charts and the poller; ``dashboard.css``: the look) is inlined where a
page says ``/*CHARTS_JS*/`` and ``/*DASHBOARD_CSS*/``; the result is read once per process.
"""

from __future__ import annotations

import functools
from importlib import resources

_SHARED = {"/*CHARTS_JS*/": "charts.js", "/*DASHBOARD_CSS*/": "dashboard.css"}


@functools.cache
def page(name: str) -> str:
    """The HTML of ``<name>.html`` with the shared chart code and style inlined."""
    files = resources.files(__name__)
    html = (files / f"{name}.html").read_text(encoding="utf-8")
    for marker, filename in _SHARED.items():
        assert marker in html, f"{name}.html has no {marker} marker"
        html = html.replace(marker, (files / filename).read_text(encoding="utf-8"))
    return html
