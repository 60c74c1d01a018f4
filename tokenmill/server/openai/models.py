"""``GET /v1/models``: the one model this server serves (generative, or ``--task embed``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tokenmill.server.openapi import READ_RESPONSES
from tokenmill.server.state import server_state

router = APIRouter()


@router.get("/v1/models", responses=READ_RESPONSES)
async def list_models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    state.require_ready()
    card = {"id": state.model_name, "object": "model", "created": state.started_at,
            "owned_by": "tokenmill"}
    if state.embedder is not None:  # --task embed
        card.update(root=str(state.embedder.path), max_model_len=state.embedder.max_seq_length,
                    task="embed", dimensions=state.embedder.dim)
    else:
        engine = state.require_engine()
        card.update(root=str(engine.core.source.path), max_model_len=engine.max_model_len)
    return {"object": "list", "data": [card]}
