"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes): the server's own tokenizer and chat
template, so clients can count tokens exactly as the engine will."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tokenmill.errors import InvalidRequestError
from tokenmill.server.openai.protocol import DetokenizeRequest, TokenizeRequest
from tokenmill.server.openapi import ENGINE_RESPONSES
from tokenmill.server.state import server_state

router = APIRouter()


@router.post("/tokenize", responses=ENGINE_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    if body.messages is not None:
        text = engine.input_processor.render_chat([m.for_template() for m in body.messages],
                                                  body.add_generation_prompt)
        tokens = engine.tokenizer.encode(text, add_special_tokens=False)
    else:
        assert body.prompt is not None
        tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens,
            "token_strs": engine.tokenizer.convert_ids_to_tokens(tokens)}


@router.post("/detokenize", responses=ENGINE_RESPONSES)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = server_state(request)
    state.check_model(body.model)
    engine = state.require_engine()
    vocab_size = engine.input_processor.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, "
                                  f"{vocab_size})", param="tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}
