"""The gateway's fleet dashboard: ``GET /dashboard`` (one HTML page) and ``GET /dashboard/data``.

The page (``tokenmill/web/fleet.html``, inline CSS and JS, no external fetch) polls
``dashboard/data?since=<latest_seq>`` once a second: the gateway's requests by outcome, cache hits,
rate-limit rejections, and each upstream replica's health, circuit, latency and requests in
flight (``tokenmill/gateway/fleet_stats.py``). It shows what ``/metrics`` shows, so it is served
when ``server.expose_metrics`` is on, without a tenant key, like ``/metrics``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, JSONResponse

from tokenmill.errors import InvalidRequestError
from tokenmill.gateway.fleet_stats import FleetHistory
from tokenmill.openai_protocol import error_response
from tokenmill.web import page


def dashboard_router(history: FleetHistory) -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page("fleet"), headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/data", summary="The fleet dashboard's figures")
    async def dashboard_data(since: Annotated[str, Query()] = "0") -> JSONResponse:
        # Parsed here, not by FastAPI, so a bad value gets the gateway's own error shape.
        if not since.isdigit():
            exc = InvalidRequestError(f"'since' must be a non-negative integer (the latest_seq "
                                      f"of the previous answer), got {since!r}", param="since")
            return error_response(exc)
        return JSONResponse(history.snapshot(int(since)), headers={"Cache-Control": "no-store"})

    return router
