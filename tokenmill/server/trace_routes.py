"""``GET /v1/requests/{request_id}/trace``: the scheduling timeline of one request.

The id is the response's ``id`` (also sent as the ``x-request-id`` header): ``cmpl-...`` or
``chatcmpl-...``. The trace is there while the request runs and for a while after it finished
(``TraceStore``: the newest 1000 finished requests, for at most 10 minutes). A completion with
several prompts lists the engine requests of every prompt; ``n > 1`` lists each sample.

Tenancy: when the gateway's ``x-tokenmill-tenant`` header is present only that tenant's requests
are found; anything else (another tenant's, unknown, expired) is the same 404, so an id reveals
nothing. Without the header (direct access to the server) every request is visible.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenmill.engine.trace_store import TraceStore
from tokenmill.errors import EngineNotReadyError, NotFoundError
from tokenmill.server.openai.serving import TENANT_HEADER, prompt_request_id
from tokenmill.server.openapi import TRACE_RESPONSES
from tokenmill.server.state import server_state

router = APIRouter()

_MAX_PROMPTS_LOOKED_UP = 10_000


def find_trace(traces: TraceStore, request_id: str, tenant: str | None
               ) -> dict[str, Any] | None:
    """The trace of a response id as the route shows it; None if not visible to ``tenant``."""
    report = traces.report(request_id, tenant)
    if report is not None:
        return report
    members = []  # several prompts: stored per prompt as <id>-0, <id>-1, ...
    for index in range(_MAX_PROMPTS_LOOKED_UP):
        member = prompt_request_id(request_id, index, 2)
        if traces.report(member, tenant) is None:
            break
        members.append(member)
    return traces.report(request_id, tenant, member_ids=members) if members else None


@router.get("/v1/requests/{request_id}/trace", responses=TRACE_RESPONSES)
async def get_request_trace(request_id: str, request: Request) -> JSONResponse:
    engine = server_state(request).engine  # still answers while draining
    if engine is None:
        raise EngineNotReadyError("the model is still loading; retry in a few seconds")
    if not engine.traces.enabled:
        raise NotFoundError("request tracing is off on this server (--no-request-trace)",
                            param="request_id", code="request_trace_disabled")
    report = find_trace(engine.traces, request_id, request.headers.get(TENANT_HEADER))
    if report is None:
        raise NotFoundError(f"no trace for request {request_id!r}: unknown, or finished too long "
                            "ago (traces are kept for the newest 1000 finished requests, up to "
                            "10 minutes)", param="request_id", code="request_not_found")
    return JSONResponse(report)
