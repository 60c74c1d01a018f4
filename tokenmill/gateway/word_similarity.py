"""Cosine similarity of single words under the gateway's sentence embedder, with a word cache.

The verifier asks "is this differing word a synonym of that one?". The sentence model already
loaded for the cache answers it without another model or a download: a word embedded alone lands
near its synonyms. It also lands near its antonyms and siblings (husband/wife, Monday/Tuesday), so
the similarity alone is a weak signal and the verifier uses it with a high threshold.
Words repeat across queries, so their vectors are kept (bounded, least recently used out).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from tokenmill.gateway.embeddings import Embedder


class WordSimilarity:
    def __init__(self, embedder: Embedder, max_words: int = 50_000) -> None:
        self.embedder = embedder
        self.max_words = max_words
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        # Lookups run in worker threads; the cache is shared between them.
        self._lock = threading.Lock()

    def vectors(self, words: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            missing = [w for w in dict.fromkeys(words) if w not in self._vectors]
        if missing:
            # One forward pass for every new word of this comparison.
            computed = self.embedder.embed(missing)
            with self._lock:
                for word, vector in zip(missing, computed):
                    self._vectors[word] = vector
        with self._lock:
            found = {}
            for word in words:
                self._vectors.move_to_end(word)
                found[word] = self._vectors[word]
            while len(self._vectors) > self.max_words:
                self._vectors.popitem(last=False)
        return found

    def matrix(self, left: list[str], right: list[str]) -> np.ndarray:
        """Cosine similarities, shape (len(left), len(right))."""
        if not left or not right:
            return np.zeros((len(left), len(right)), dtype=np.float32)
        found = self.vectors(left + right)
        a = np.stack([found[w] for w in left])
        b = np.stack([found[w] for w in right])
        return a @ b.T
