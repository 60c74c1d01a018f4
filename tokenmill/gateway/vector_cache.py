"""Exemplar vectors kept on disk, so a gateway start with the injection detector does not embed
its whole exemplar library again (about a minute of MiniLM and SmolLM2 passes on one thread).

What is cached is plain data: one float32 matrix per view and library, in a ``.npz`` file, never a
pickled model (the classifiers are still fitted at start-up, in seconds, from these vectors). A
file is named by a key, the sha256 of everything the vectors depend on:

- the view's model identity (``identity()`` of the embedder: its class, model path, the size,
  modification time and a hash of the first MiB of its weights files, and settings such as
  pooling, dtype and token limit), so a new model, a re-quantized file or another pooling misses;
- the exact texts, in order: a changed library misses as a whole and is embedded again in the same
  batches as without a cache, so the vectors match a fresh computation;
- a format version of this module.

An embedder without ``identity()`` (a test double, a remote service) is never cached. Writes go to
a temporary file in the same folder and are renamed into place, so a reader never sees half a
file and concurrent gateways at most write the same file twice. A file that cannot be read, or
holds another key or the wrong shape, is logged and rebuilt: a cache problem never stops a start.

The folder does not grow for ever: a file read is touched, and a new file's write removes the
view's files beyond the ``KEEP_PER_VIEW`` most recently used (several gateways with different
libraries or models can share the folder, each keeping its own files fresh).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("tokenmill.gateway")
FORMAT_VERSION = 1
# What "off" in ``guardrails.injection_detector.vector_cache_dir`` means.
DISABLED = "off"
# Enough of a weights file to cover its header (GGUF metadata and tensor table, a safetensors
# header) and first tensors; hashing whole files of hundreds of MB would cost more than it saves.
_HEADER_BYTES = 1 << 20
# Files kept per view: a few libraries or models in use side by side, not every past edit.
KEEP_PER_VIEW = 8


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tokenmill``, else ``~/.cache/tokenmill`` (the XDG default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenmill"


def files_identity(path: str | Path) -> dict[str, Any]:
    """A model file's (or every file of a model folder's) size, modification time and header
    hash: cheap to compute, and it changes when the weights are replaced."""
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    found = {}
    for file in files:
        stat = file.stat()
        with file.open("rb") as handle:
            head = hashlib.sha256(handle.read(_HEADER_BYTES)).hexdigest()
        found[str(file.relative_to(root)) if root.is_dir() else file.name] = [
            stat.st_size, stat.st_mtime_ns, head]
    return {"path": str(root), "files": found}


def model_identity(embedder: Any) -> dict[str, Any] | None:
    """``embedder.identity()``, looking through wrappers (``embedding_memo``) that name the model
    they wrap as ``inner``; None when the embedder cannot say what it is."""
    while not hasattr(embedder, "identity") and hasattr(embedder, "inner"):
        embedder = embedder.inner
    identity = getattr(embedder, "identity", None)
    return identity() if callable(identity) else None


class VectorCache:
    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder else default_cache_dir()
        self.num_hits = 0
        self.num_misses = 0

    @staticmethod
    def key(view: str, identity: dict[str, Any], texts: list[str]) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps([FORMAT_VERSION, view, identity], sort_keys=True).encode())
        for text in texts:
            encoded = text.encode()
            # Length-prefixed, so ["ab", "c"] and ["a", "bc"] differ.
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
        return digest.hexdigest()

    def path(self, view: str, key: str) -> Path:
        return self.folder / f"injection-{view}-{key[:40]}.npz"

    def load(self, view: str, key: str, num_texts: int) -> np.ndarray | None:
        path = self.path(view, key)
        if not path.is_file():
            self.num_misses += 1
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                stored_key = str(data["key"])
                vectors = np.asarray(data["vectors"], dtype=np.float32)
            if stored_key != key or vectors.ndim != 2 or len(vectors) != num_texts or \
                    not np.isfinite(vectors).all():
                raise ValueError("it holds other vectors than its name says")
        except Exception as exc:  # noqa: BLE001 -- any unreadable file is rebuilt, never fatal
            logger.warning("injection detector: ignoring the cached vectors in %s (%s); "
                           "embedding the exemplars again", path, exc)
            self.num_misses += 1
            return None
        self.num_hits += 1
        try:
            os.utime(path)  # used now: pruning keeps the recently used files
        except OSError:
            pass
        return vectors

    def store(self, view: str, key: str, vectors: np.ndarray) -> None:
        path = self.path(view, key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.savez(handle, key=np.array(key),
                             vectors=np.asarray(vectors, dtype=np.float32))
                os.replace(temp, path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
            self._prune(view)
        except OSError as exc:  # a read-only home, a full disk: the next start embeds again
            logger.warning("injection detector: could not cache the exemplar vectors in %s (%s)",
                           path, exc)


    def _prune(self, view: str) -> None:
        """Remove the view's files beyond the ``KEEP_PER_VIEW`` most recently used."""
        def last_used(file: Path) -> float:
            try:
                return file.stat().st_mtime
            except OSError:  # removed meanwhile by another gateway's prune
                return 0.0

        files = sorted(self.folder.glob(f"injection-{view}-*.npz"), key=last_used, reverse=True)
        for old in files[KEEP_PER_VIEW:]:
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("injection detector: could not remove the old vectors %s (%s)",
                               old, exc)


def cache_for(setting: str | None) -> VectorCache | None:
    """The cache a ``vector_cache_dir`` setting names: None the default folder, "off" none."""
    return None if setting == DISABLED else VectorCache(setting)
