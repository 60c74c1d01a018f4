"""The live dashboard: ``GET /dashboard`` (one HTML page) and ``GET /dashboard/data`` (its JSON).

The page is static (``tokenmill/web/server.html``, with inline CSS and JS, no external fetch) and
polls ``dashboard/data`` once a second with ``?since=<latest_seq it holds>``, so each poll carries
only the new points of the history (``tokenmill/server/stats_history.py``). Both answer while the
model loads: the data then has no model and no points yet. Like ``/metrics``, neither needs a key.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from tokenmill.server.state import server_state
from tokenmill.web import page

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(page("server"), headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/data", summary="The dashboard's figures: a history sampled every second")
async def dashboard_data(
        request: Request,
        since: Annotated[int, Query(ge=0, description="Return only the points whose seq is "
                                    "greater (the latest_seq of the previous answer).")] = 0,
) -> JSONResponse:
    state = server_state(request)
    body = state.history.snapshot(since)
    body["phase"] = state.phase
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
