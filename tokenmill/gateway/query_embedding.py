"""The request's query embedding, computed once and shared by every stage that needs it.

The semantic cache and RAG both match on the last user message (``protocol.query_text``). The
first of them to ask embeds it (off the event loop) and keeps the vector on the request; the
next one reuses it as long as the text is unchanged, so a request costs one forward pass.
"""

from __future__ import annotations

import asyncio

import numpy as np

from tokenmill.gateway.embeddings import Embedder
from tokenmill.gateway.pipeline import GatewayRequest


async def embed_query(request: GatewayRequest, embedder: Embedder, text: str) -> np.ndarray:
    kept = request.query_embedding
    if kept is not None and kept[0] == text:
        return kept[1]
    # The model runs off the event loop so other requests keep flowing meanwhile.
    vector = (await asyncio.to_thread(embedder.embed, [text]))[0]
    request.query_embedding = (text, vector)
    return vector
