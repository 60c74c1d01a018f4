"""An embedder that remembers its last few thousand texts, so one request's text is embedded once.

The injection detector scores the user's message as a whole (its first window); the semantic
cache and RAG then embed the same text as their query (``embed_query``). Put behind this wrapper
(``app.build_gateway`` does), the second and third calls are dictionary look-ups instead of MiniLM
forward passes (~25 ms each on one CPU thread). Vectors are the model's own, so results are
unchanged. This is the gateway's one embedding cache: stages just ask.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

import numpy as np

from tokenmill.gateway.embeddings import Embedder


class MemoizedEmbedder:
    def __init__(self, inner: Embedder, max_entries: int = 4096) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.max_entries = max_entries
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # embed() runs on worker threads
        self.num_hits = 0
        self.num_misses = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            known = {t: self._vectors[t] for t in texts if t in self._vectors}
            for t in known:
                self._vectors.move_to_end(t)
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        fresh = dict(zip(missing, self.inner.embed(missing))) if missing else {}
        with self._lock:
            self.num_hits += len(texts) - len(missing)
            self.num_misses += len(missing)
            for text, vector in fresh.items():
                self._vectors[text] = vector
            while len(self._vectors) > self.max_entries:
                self._vectors.popitem(last=False)
        vectors = [known[t] if t in known else fresh[t] for t in texts]
        return np.stack(vectors).astype(np.float32, copy=False) if vectors else \
            np.zeros((0, self.dim), dtype=np.float32)


async def embed_query(embedder: Embedder, text: str) -> np.ndarray:
    """``text``'s vector, computed off the event loop so other requests keep flowing."""
    return (await asyncio.to_thread(embedder.embed, [text]))[0]
