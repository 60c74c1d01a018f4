"""Text vectors from the built-in generative model (SmolLM2-135M-Instruct), run in-process: the
prompt's final hidden states, pooled, exactly as ``/v1/embeddings --pooling mean|last`` computes
them (docs/embeddings.md), for the injection detector's third view.

Why a generative model as a feature source: the gateway's MiniLM reads English only (its
BERT-uncased word pieces turn most non-Latin scripts into [UNK]), while SmolLM2's byte-level
BPE covers every script and it has seen some multilingual web text. It is a weak embedder, so
the detector fits its own classifier on these vectors rather than comparing them by cosine.

Cost: the model is loaded on first use (~270 MB of bfloat16 weights plus a small KV pool) and
every window is one prefill. One engine, one caller at a time (a lock), as the engine is not
re-entrant.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import TYPE_CHECKING

import numpy as np

from tokenmill.gateway.embedding_memo import MemoizedEmbedder
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.llm import LLM

logger = logging.getLogger("tokenmill.gateway")
POOLINGS = ("mean", "last")
# A whole text longer than this is pooled over its first tokens only; its sentence windows are
# scored separately, so nothing past the cut goes unread.
_MAX_TOKENS = 512
# The KV pool a prefill-only model needs: one step's chunks, never a long conversation.
_KV_BYTES = 64 * 2**20
_BATCH = 256


class LLMEmbedder:
    """``Embedder`` (``embeddings.py``) over the built-in LLM's pooled final hidden states:
    unit-length float32 vectors of ``dim`` (576 for SmolLM2-135M)."""

    def __init__(self, llm: LLM | None = None, pooling: str = "mean", model: str | None = None,
                 num_threads: int | None = None) -> None:
        """``llm``: an engine to share (its other callers must not step it concurrently);
        default: ``model`` (default: the built-in one), loaded here with a small KV pool."""
        from tokenmill.engine.llm import LLM

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.pooling = pooling
        self.llm = llm or LLM(model, kv_cache_memory=_KV_BYTES, num_threads=num_threads)
        self.dim = int(self.llm.engine.source.arch.hidden_size)
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def identity(self) -> dict[str, object]:
        """What these vectors depend on, for caches that outlive the process (``vector_cache``):
        the weights file(s), how they are computed (dtype, quantization) and pooled."""
        from tokenmill.gateway.vector_cache import files_identity

        model = self.llm.config.model
        return {"embedder": type(self).__name__,
                "model": files_identity(self.llm.engine.source.path),
                "dtype": model.resolved_dtype(), "quantization": model.quantization,
                "device": model.device, "pooling": self.pooling, "max_tokens": _MAX_TOKENS}

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        prompts = [self._token_ids(t) for t in texts]
        pooled: list[np.ndarray] = []
        with self._lock:
            # In batches: the engine's waiting queue is bounded (max_waiting_requests).
            for start in range(0, len(prompts), _BATCH):
                pooled += self._pooled(prompts[start:start + _BATCH])
        vectors = np.asarray(pooled, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def _token_ids(self, text: str) -> list[int]:
        # An empty or whitespace-only text still needs a token to pool: the end-of-text token.
        ids = self.llm.tokenizer.encode(text)[:_MAX_TOKENS]
        return ids or [self.llm.tokenizer.eos_token_id]

    def _pooled(self, prompts: list[list[int]]) -> list[np.ndarray]:
        llm = self.llm
        params = SamplingParams(max_tokens=1)  # nothing is sampled: the prompt is pooled
        order: dict[str, int] = {}
        for index, ids in enumerate(prompts):
            request_id = f"pool-{next(self._ids)}"
            order[request_id] = index
            children = llm.input_processor.make_requests(request_id, ids, params,
                                                         pooling=self.pooling)
            for child in children:
                llm.engine.add_request(child)
            llm.output_processor.add_request(request_id, None, children)
        result: list[np.ndarray | None] = [None] * len(prompts)
        for output in llm._run_to_completion(len(prompts), use_tqdm=False):
            index = order[output.request_id]
            vector = np.asarray(output.embedding, dtype=np.float64)
            # Mean pooling hands back the sum of the prompt's rows (docs/embeddings.md).
            result[index] = vector / len(prompts[index]) if self.pooling == "mean" else vector
        return result  # type: ignore[return-value]


_shared: dict[str, MemoizedEmbedder | None] = {}
_shared_lock = threading.Lock()


def shared_llm_embedder(pooling: str = "mean", model: str | None = None
                        ) -> MemoizedEmbedder | None:
    """The built-in model's embedder, loaded once per process on first call; None, with a
    warning, when it cannot be loaded: the detector then runs on its other two views (and its
    scores are those of the two-view model, whose dev curve docs/gateway.md gives too)."""
    with _shared_lock:
        key = f"{pooling}:{model}"
        if key not in _shared:
            try:
                # memoized like MiniLM (embedding_memo.py): a repeated text, e.g. an exact
                # cache hit that the guardrails still screen, costs a look-up, not a forward pass
                _shared[key] = MemoizedEmbedder(LLMEmbedder(pooling=pooling, model=model))
            except Exception as exc:  # noqa: BLE001 -- any load failure (weights, memory) degrades
                logger.warning("injection detector: the built-in LLM view is unavailable (%s); "
                               "scoring with the MiniLM and n-gram views only", exc)
                _shared[key] = None
        return _shared[key]
