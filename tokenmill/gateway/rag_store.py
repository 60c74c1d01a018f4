"""RAG collections on disk: chunked text/Markdown files, their vectors (FAISS) and a JSON sidecar.

A collection is a folder ``<rag dir>/<name>/`` with ``index.faiss`` (inner product on unit vectors,
ids = chunk ids) and ``chunks.json`` (chunk texts and sources, and a sha256 per source file).
Ingesting again re-embeds only files whose content changed and replaces their chunks. Both files
are written to a temporary name and renamed, so a gateway reading them never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.errors import InvalidRequestError, NotFoundError
from tokenmill.gateway.embeddings import Embedder

TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_HEADING_RE = re.compile(r"^#{1,6}\s+(.*)$")


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    source: str
    position: int
    text: str


@dataclass(frozen=True)
class Retrieved:
    chunk: Chunk
    score: float


@dataclass(frozen=True)
class CollectionView:
    """One loaded state of a collection: what a request searches, and its version.

    ``version`` is a hash of the source files' digests, so it changes exactly when an ingest
    changed the documents; caches key answers on it (an answer from older documents is not
    served after a re-ingest)."""

    version: str
    index: Any
    chunks: dict[int, Chunk]

    def search(self, vector: np.ndarray, top_k: int) -> list[Retrieved]:
        if self.index is None or self.index.ntotal == 0:
            return []
        scores, ids = self.index.search(vector.reshape(1, -1), min(top_k, self.index.ntotal))
        return [Retrieved(self.chunks[int(i)], float(s)) for s, i in zip(scores[0], ids[0])
                if int(i) in self.chunks]


@dataclass(frozen=True)
class RagPlan:
    """What the gateway's ``rag_spec`` stage resolved for a request: the collection as loaded,
    and top_k. It lives here, not in rag.py, so the pipeline's request type can name it without
    importing the stages."""

    collection: str
    top_k: int
    view: CollectionView

    @property
    def cache_key(self) -> str:
        return json.dumps([self.collection, self.top_k, self.view.version])


def files_version(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class IngestReport:
    num_files_added: int
    num_files_changed: int
    num_files_unchanged: int
    num_files_removed: int
    num_chunks: int


def check_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidRequestError(f"collection name {name!r} must be 1-64 letters, digits, '_', "
                                  "'-' or '.', not starting with '.' or '-'",
                                  param="rag.collection")
    return name


def chunk_text(text: str, max_chars: int = 800) -> list[str]:
    """Split on blank lines, keep each paragraph under its nearest Markdown heading, and pack
    paragraphs into chunks of up to ``max_chars`` (a longer paragraph is cut on sentences)."""
    chunks: list[str] = []
    heading = ""
    current: list[str] = []

    def flush() -> None:
        if current:
            body = "\n\n".join(current)
            chunks.append(f"{heading}\n{body}" if heading else body)
            current.clear()

    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if not block:
            continue
        match = _HEADING_RE.match(block.splitlines()[0])
        if match:
            flush()
            heading = match.group(1).strip()
            block = "\n".join(block.splitlines()[1:]).strip()
            if not block:
                continue
        for piece in _split_long(block, max_chars):
            if current and sum(len(c) + 2 for c in current) + len(piece) > max_chars:
                flush()
            current.append(piece)
    flush()
    return chunks


def _split_long(block: str, max_chars: int) -> list[str]:
    if len(block) <= max_chars:
        return [block]
    pieces: list[str] = []
    current = ""
    for sentence in re.split(r"(?<=[.!?])\s+", block):
        while len(sentence) > max_chars:  # one huge "sentence": cut it hard
            pieces.append(sentence[:max_chars])
            sentence = sentence[max_chars:]
        if current and len(current) + len(sentence) + 1 > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return pieces


class Collection:
    def __init__(self, root: Path, name: str, dim: int) -> None:
        self.name = check_collection_name(name)
        self.folder = root / name
        self.dim = dim
        self.files: dict[str, str] = {}
        self.chunks: dict[int, Chunk] = {}
        self.next_id = 0
        self.index: Any = None
        self.loaded_mtime = -1.0
        self.view: CollectionView | None = None
        """The state the gateway searches, replaced whole on reload (never half-updated)."""
        self._reload_lock = threading.Lock()

    @property
    def sidecar(self) -> Path:
        return self.folder / "chunks.json"

    def exists(self) -> bool:
        return self.sidecar.is_file()

    def load(self) -> None:
        import faiss

        mtime = self.sidecar.stat().st_mtime
        data = json.loads(self.sidecar.read_text())
        self.files = data["files"]
        self.next_id = data["next_id"]
        self.chunks = {int(c["chunk_id"]): Chunk(**c) for c in data["chunks"]}
        self.index = faiss.read_index(str(self.folder / "index.faiss"))
        self.view = CollectionView(files_version(self.files), self.index, dict(self.chunks))
        self.loaded_mtime = mtime

    def reload_if_changed(self) -> CollectionView:
        """The current view, (re)loaded first when the collection changed on disk. Blocking
        file reads: the gateway calls it in a worker thread."""
        if not self.exists():
            raise NotFoundError(f"RAG collection {self.name!r} does not exist; create it with "
                                f"`tokenmill rag ingest DIR --collection {self.name}`",
                                param="rag.collection", code="collection_not_found")
        with self._reload_lock:  # concurrent requests load a changed collection once
            if self.sidecar.stat().st_mtime != self.loaded_mtime or self.view is None:
                self.load()
            assert self.view is not None
            return self.view

    def search(self, vector: np.ndarray, top_k: int) -> list[Retrieved]:
        return self.view.search(vector, top_k) if self.view is not None else []

    def ingest(self, folder: Path, embedder: Embedder, *, max_chars: int = 800,
               prune: bool = False) -> IngestReport:
        import faiss

        if not folder.is_dir():
            raise InvalidRequestError(f"{str(folder)!r} is not a folder", param="DIR")
        if self.exists():
            self.load()
        else:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(embedder.dim))
        paths = sorted(p for p in folder.rglob("*") if p.is_file()
                       and p.suffix.lower() in TEXT_SUFFIXES)
        seen, added, changed, unchanged = set(), 0, 0, 0
        for path in paths:
            source = path.relative_to(folder).as_posix()
            seen.add(source)
            text = path.read_text(encoding="utf-8", errors="replace")
            digest = hashlib.sha256(text.encode()).hexdigest()
            if self.files.get(source) == digest:
                unchanged += 1
                continue
            if source in self.files:
                changed += 1
                self._drop_source(source)
            else:
                added += 1
            pieces = chunk_text(text, max_chars)
            if pieces:
                vectors = embedder.embed([f"{source}\n{p}" for p in pieces])
                ids = np.arange(self.next_id, self.next_id + len(pieces), dtype=np.int64)
                self.index.add_with_ids(vectors, ids)
                for position, (chunk_id, piece) in enumerate(zip(ids, pieces)):
                    self.chunks[int(chunk_id)] = Chunk(int(chunk_id), source, position, piece)
                self.next_id += len(pieces)
            self.files[source] = digest
        removed = 0
        if prune:
            for source in sorted(set(self.files) - seen):
                self._drop_source(source)
                del self.files[source]
                removed += 1
        self._save()
        return IngestReport(added, changed, unchanged, removed, len(self.chunks))

    def _drop_source(self, source: str) -> None:
        ids = [i for i, c in self.chunks.items() if c.source == source]
        if ids:
            self.index.remove_ids(np.array(ids, dtype=np.int64))
        for i in ids:
            del self.chunks[i]

    def _save(self) -> None:
        import faiss

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp_index = self.folder / "index.faiss.tmp"
        faiss.write_index(self.index, str(tmp_index))
        os.replace(tmp_index, self.folder / "index.faiss")
        data = {"name": self.name, "next_id": self.next_id, "files": self.files,
                "chunks": [c.__dict__ for c in sorted(self.chunks.values(),
                                                      key=lambda c: c.chunk_id)]}
        tmp = self.folder / "chunks.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.sidecar)  # written last: its mtime tells readers to reload


class RagStore:
    """The collections under one folder, loaded lazily and reloaded when re-ingested."""

    def __init__(self, root: str | Path, dim: int) -> None:
        self.root = Path(root)
        self.dim = dim
        self._collections: dict[str, Collection] = {}

    def collection(self, name: str) -> Collection:
        check_collection_name(name)
        if name not in self._collections:
            self._collections[name] = Collection(self.root, name, self.dim)
        return self._collections[name]
