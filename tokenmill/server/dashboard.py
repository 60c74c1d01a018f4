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

from tokenmill.errors import InvalidRequestError
from tokenmill.server.openapi import DASHBOARD_DATA_RESPONSES
from tokenmill.server.state import server_state
from tokenmill.web import page

router = APIRouter()


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(page("server"), headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/data", summary="The dashboard's figures: a history sampled every second",
            responses=DASHBOARD_DATA_RESPONSES)
async def dashboard_data(
        request: Request,
        since: Annotated[str, Query(description="Return only the points whose seq is greater "
                                    "(the latest_seq of the previous answer).",
                                    json_schema_extra={"pattern": "^[0-9]+$"})] = "0",
) -> JSONResponse:
    # Parsed here rather than by FastAPI so the error names 'since' as the client wrote it.
    if not (since.isascii() and since.isdigit()):  # "²".isdigit() is true; int("²") fails
        raise InvalidRequestError(f"'since' must be a non-negative integer (the latest_seq of "
                                  f"the previous answer), got {since!r}", param="since")
    state = server_state(request)
    body = state.history.snapshot(int(since))
    body["phase"] = state.phase
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
