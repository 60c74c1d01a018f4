"""``POST /v1/embeddings``: one vector per input, in OpenAI's shape.

Two models can answer, one per server:

* the served generative model (``tokenmill serve``): each input becomes an engine request that
  pools the prompt's final hidden states (``--pooling last|mean``) instead of sampling. It is
  admitted, queued and batched like any generation (the same waiting-queue bound and token
  budget), on the engine thread, and keeps no KV once done;
* a sentence-transformers model (``tokenmill serve --task embed``), run on a worker thread.

Vectors are L2-normalized unless the server runs with ``--no-normalize-embeddings``. Each input is
bounded by the model's context (generative) or ``max_seq_length`` (embed): a longer one is a 400
naming ``input`` and the limit, never silently truncated. ``dimensions`` (shortened vectors) is
not supported: any value but the model's own size is a 400.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.openai.schema_types import ModelName
from tokenmill.server.openai.serving import RequestGroup, new_request_id, respond
from tokenmill.server.openapi import EMBEDDING_RESPONSES
from tokenmill.server.state import ServerState, server_state

router = APIRouter()

MAX_INPUTS = 2048
"""Most inputs in one request (OpenAI's limit)."""

EmbeddingInput = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
     "maxItems": MAX_INPUTS},
    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                "minItems": 1}, "minItems": 1, "maxItems": MAX_INPUTS}]})]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: ModelName
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        allowed = ("must be a non-empty string, a list of non-empty strings, a list of token ids "
                   "or a list of token-id lists")
        if isinstance(value, str):
            if not value:
                raise ValueError(allowed)
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(allowed)
        if len(value) > MAX_INPUTS and not all(_is_token_id(t) for t in value):
            raise ValueError(f"holds {len(value)} inputs; at most {MAX_INPUTS} per request")
        if all(isinstance(s, str) and s for s in value):
            return value
        if all(_is_token_id(t) for t in value):
            return [int(t) for t in value]
        if all(isinstance(ids, list) and ids and all(_is_token_id(t) for t in ids)
               for ids in value):
            return [[int(t) for t in ids] for ids in value]
        raise ValueError(allowed)

    def inputs(self) -> list[str | list[int]]:
        """One entry per input: text, or token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)


def _is_token_id(value: Any) -> bool:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_dimensions(body: EmbeddingRequest, dim: int) -> None:
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidRequestError(
            f"dimensions={body.dimensions} is not supported: this model's embeddings have {dim} "
            "dimensions and cannot be shortened; leave dimensions out", param="dimensions")


def _check_lengths(lengths: list[int], limit: int, what: str) -> None:
    for index, length in enumerate(lengths):
        if length > limit:
            raise InvalidRequestError(
                f"input[{index}] has {length} tokens, more than {what} of {limit} tokens; "
                "shorten it or split it", param="input")
        if length == 0:
            raise InvalidRequestError(f"input[{index}] is empty", param="input")


def _normalized(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _response(body: EmbeddingRequest, name: str, vectors: np.ndarray,
              num_tokens: int) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(vectors.astype("<f4")):
        embedding: Any = (base64.b64encode(vector.tobytes()).decode("ascii")
                          if body.encoding_format == "base64" else vector.tolist())
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {"object": "list", "data": data, "model": name,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


async def _embed_with_sentence_transformers(state: ServerState, body: EmbeddingRequest
                                            ) -> dict[str, Any]:
    embedder = state.embedder
    assert embedder is not None
    _check_dimensions(body, embedder.dim)
    texts = body.inputs()
    if not all(isinstance(text, str) for text in texts):
        raise InvalidRequestError("this embedding model (--task embed) takes text; token-id "
                                  "input is for the served generative model", param="input")
    lengths = await asyncio.to_thread(embedder.count_tokens, texts)
    _check_lengths(lengths, embedder.max_seq_length, "the model's max_seq_length")
    normalize = state.settings.engine.model.normalize_embeddings
    vectors = await asyncio.to_thread(embedder.encode, texts, normalize)
    return _response(body, embedder.name, vectors, sum(lengths))


async def _embed_with_engine(state: ServerState, body: EmbeddingRequest,
                             request: Request) -> Response:
    engine = state.require_engine()
    _check_dimensions(body, engine.core.source.arch.hidden_size)
    inputs = body.inputs()

    def tokenize() -> list[list[int]]:
        return [engine.tokenizer.encode(i) if isinstance(i, str) else i for i in inputs]

    prompts = await asyncio.to_thread(tokenize)  # grows with the input: off the event loop
    _check_lengths([len(p) for p in prompts], engine.max_model_len, "the model's context")
    config = state.settings.engine.model
    params = [SamplingParams(max_tokens=1)] * len(prompts)  # nothing is sampled (pooling)
    try:
        group = await RequestGroup.start(engine, state.metrics, new_request_id("embd"), prompts,
                                         params, None, pooling=config.pooling)
    except InvalidRequestError as exc:
        if exc.param != "prompt":
            raise
        raise type(exc)(exc.message, param="input", code=exc.code) from None

    def answer(finals: list[Any]) -> dict[str, Any]:
        vectors = np.array([final.embedding for final in finals], dtype=np.float32)
        if config.normalize_embeddings:
            vectors = _normalized(vectors)
        return _response(body, engine.model_name, vectors, sum(len(p) for p in prompts))

    return await respond(request, group, False, _no_stream, answer)


def _no_stream() -> Any:
    raise AssertionError("embeddings are never streamed")


@router.post("/v1/embeddings", responses=EMBEDDING_RESPONSES)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Any:
    state = server_state(request)
    state.check_model(body.model)
    if state.embedder is not None:
        return await _embed_with_sentence_transformers(state, body)
    return await _embed_with_engine(state, body, request)
