"""``GET /v1/models``: the one model this server serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tokenmill.server.openapi import READ_RESPONSES
from tokenmill.server.state import server_state

router = APIRouter()


@router.get("/v1/models", responses=READ_RESPONSES)
async def list_models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    engine = state.require_engine()
    card = {"id": engine.model_name, "object": "model", "created": state.started_at,
            "owned_by": "tokenmill", "root": str(engine.core.source.path),
            "max_model_len": engine.max_model_len}
    return {"object": "list", "data": [card]}
