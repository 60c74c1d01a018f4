"""Text vectors from WordLlama (``wordllama==0.4.0.post1`` on PyPI): static token embeddings
distilled from large Llama-2 models, averaged over a text's tokens, tried as a fourth view of the
injection detector by ``injection_views_cv.py`` (session 26). Not adopted: alone it caught 36% of
dev attacks at 3% false positives, and added to the three views it lowered detection in every
form tried (docs/gateway.md), so it is not a gateway dependency; this file is the experiment's.

Why this model: its 32k Llama-2 BPE vocabulary covers every script (byte fallback) and its token
vectors were trained from multilingual LLMs, where the gateway's MiniLM reads English only; it is
a bag of tokens with no context, so the detector fits its own classifier on the vectors rather
than comparing them by cosine. It costs next to nothing: 16 MB of weights, a table look-up and
a mean per text (tens of microseconds), no torch.

The wheel ships its weights (``weights/l2_supercat_256.safetensors``, 32000 x 256, float16) and
tokenizer (``tokenizers/l2_supercat_tokenizer_config.json``). They are read here directly rather
than through ``WordLlama.load()``, for two reasons: that loader looks for the tokenizer under
``tokenizer/`` (singular) next to the package, misses the shipped ``tokenizers/`` file and
downloads it from the Hugging Face hub, which a gateway must never do; and importing the package
calls ``logging.basicConfig(level=INFO)``, which would reconfigure the gateway's root logger. The
vectors are the same as ``WordLlama.load().embed(texts, norm=True)``: the mean of the token rows
(no special tokens), scaled to unit length.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

WEIGHTS = Path("weights") / "l2_supercat_256.safetensors"
TOKENIZER = Path("tokenizers") / "l2_supercat_tokenizer_config.json"


def package_dir() -> Path:
    """Where the ``wordllama`` package is installed, found without importing it."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the wordllama package is not installed "
                                  "(pip install --no-deps wordllama==0.4.0.post1)")
    return Path(next(iter(spec.submodule_search_locations)))


class WordLlamaEmbedder:
    """``Embedder`` (``embeddings.py``): unit-length float32 vectors of ``dim`` (256)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        """``folder``: a directory holding ``weights/`` and ``tokenizers/`` as the wheel lays
        them out (default: the installed package)."""
        from safetensors import safe_open
        from tokenizers import Tokenizer

        self.folder = Path(folder) if folder else package_dir()
        for part in (WEIGHTS, TOKENIZER):
            if not (self.folder / part).is_file():
                raise FileNotFoundError(f"WordLlama file {self.folder / part} is missing")
        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        with safe_open(str(self.folder / WEIGHTS), framework="np") as weights:
            self.table = np.ascontiguousarray(weights.get_tensor("embedding.weight"),
                                              dtype=np.float32)
        self.dim = int(self.table.shape[1])
        self._lock = threading.Lock()  # a tokenizer object is not documented as thread-safe

    def identity(self) -> dict[str, object]:
        """What these vectors depend on, for caches that outlive the process (``vector_cache``)."""
        from tokenmill.gateway.vector_cache import files_identity

        return {"embedder": type(self).__name__,
                "weights": files_identity(self.folder / WEIGHTS),
                "tokenizer": files_identity(self.folder / TOKENIZER), "pooling": "mean"}

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        with self._lock:
            encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        for row, tokens in enumerate(encoded):
            ids = np.clip(np.asarray(tokens.ids, dtype=np.int64), 0, len(self.table) - 1)
            if len(ids):  # an empty text keeps the zero vector: no token, no direction
                vectors[row] = self.table[ids].mean(axis=0)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)
