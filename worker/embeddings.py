"""Sentence embeddings for vector and hybrid retrieval: the model, loaded once, and the corpus's vectors, cached on disk.

The embedder runs on the worker process's CPU, never the GPU: the engine process owns the accelerator, a second
CUDA context here would take its memory, and MiniLM embeds a microbatch's questions in milliseconds on a CPU.
The corpus is embedded once per (corpus, model) and kept in `<data_dir>/embeddings/`, so a restart reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import RagqError

log = logging.getLogger(__name__)

# Texts embedded per encode step; the corpus is embedded in such chunks, questions in one call per microbatch.
ENCODE_BATCH = 32
CACHE_FORMAT = 1


class RetrievalUnavailable(RagqError):
    """Vector or hybrid retrieval was asked for, but this worker has no embedding model (it could not load)."""

    type = "retrieval_unavailable"


def document_text(doc: dict[str, Any]) -> str:
    """What is embedded of a FAQ entry: its question and answer (tuned on the dev set: question alone or the
    answer alone rank worse)."""
    return f"{doc['question']} {doc['text']}"


class Embedder:
    """A sentence-transformers model on the CPU: texts in, unit-length float32 vectors out."""

    def __init__(self, source: str, model: Any) -> None:
        self.source = source
        self.model = model
        self.fingerprint = model_fingerprint(source)
        # The preparer (questions) and task threads (scoring answers) share the model: a Rust tokenizer used
        # by two threads at once raises "Already borrowed".
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one row per text, in one call (cosine similarity is then a dot product)."""
        with self._lock:
            vectors = self.model.encode(
                list(texts), batch_size=ENCODE_BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return np.asarray(vectors, dtype=np.float32)


def load_embedder(source: str) -> Embedder:
    """The sentence-transformers model at `source` (a Hugging Face id or a local directory), on the CPU."""
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(source, device="cpu")
    except Exception as exc:  # any failure to load (missing, offline, corrupt) means the same to a job
        raise RetrievalUnavailable(f"the embedding model {source!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return Embedder(source, model)


def model_fingerprint(source: str) -> str:
    """What identifies a model's weights: a local directory's files (names, sizes, modification times), or the id."""
    path = Path(source)
    parts = [source]
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            parts.append(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def corpus_fingerprint(documents: Sequence[dict[str, Any]]) -> str:
    """A hash of exactly what is embedded of the corpus, in order."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}\n".encode())
    for doc in documents:
        digest.update(json.dumps([doc["id"], document_text(doc)]).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def corpus_vectors(embedder: Embedder, documents: Sequence[dict[str, Any]], cache_dir: Path) -> np.ndarray:
    """The corpus's vectors: read from the cache when this corpus was embedded with this model before, else
    embedded now and written there (atomically, so a worker starting beside it never reads half a file)."""
    path = cache_dir / "embeddings" / f"{corpus_fingerprint(documents)}-{embedder.fingerprint}.npy"
    if path.exists():
        try:
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == len(documents):
                log.info("corpus embeddings read from %s", path)
                return vectors
        except (OSError, ValueError) as exc:
            log.warning("corpus embeddings cache %s is unreadable (%s); embedding again", path, exc)
    started = time.perf_counter()
    vectors = embedder.encode([document_text(doc) for doc in documents])
    log.info("embedded %d documents with %s in %.1f s", len(documents), embedder.source, time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.part.npy")
    np.save(partial, vectors, allow_pickle=False)
    partial.replace(path)
    return vectors


class VectorIndex:
    """The corpus's unit vectors as one matrix: a microbatch's cosine scores are one matrix product."""

    def __init__(self, embedder: Embedder, vectors: np.ndarray) -> None:
        self.embedder = embedder
        self.vectors = vectors

    def scores(self, questions: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each question (one encode call for all) to every document: (questions, documents)."""
        if not questions:
            return np.zeros((0, len(self.vectors)), dtype=np.float32)
        return self.embedder.encode(questions) @ self.vectors.T


class LazyVectorIndex:
    """Builds the vector index on first use (or at start, via `load_now`), once; remembers a failure to load,
    so each later vector or hybrid job fails at once with `RetrievalUnavailable` instead of trying again."""

    def __init__(self, build: Callable[[], VectorIndex]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._index: VectorIndex | None = None
        self._failure: RetrievalUnavailable | None = None

    def get(self) -> VectorIndex:
        """The index, built now if need be; raises `RetrievalUnavailable` if it cannot be."""
        with self._lock:
            if self._index is None and self._failure is None:
                try:
                    self._index = self._build()
                except RetrievalUnavailable as exc:
                    self._failure = exc
                except Exception as exc:  # embedding the corpus failed: jobs learn it, the worker goes on
                    self._failure = RetrievalUnavailable(f"the corpus could not be embedded: {type(exc).__name__}: {exc}")
                if self._failure is not None:
                    log.error("vector retrieval is unavailable in this worker: %s", self._failure.message)
            if self._failure is not None:
                raise self._failure
            assert self._index is not None
            return self._index

    def load_now(self) -> None:
        """Build at start (the default mode needs it); a failure is logged and kept for the jobs, not raised."""
        try:
            self.get()
        except RetrievalUnavailable:
            pass

    @property
    def loaded(self) -> bool:
        return self._index is not None


def vector_index(source: str, documents: Sequence[dict[str, Any]], cache_dir: Path) -> LazyVectorIndex:
    """The lazily built index of `documents` with the embedding model at `source`."""

    def build() -> VectorIndex:
        started = time.perf_counter()
        embedder = load_embedder(source)
        log.info("embedding model %s loaded in %.1f s (CPU)", source, time.perf_counter() - started)
        return VectorIndex(embedder, corpus_vectors(embedder, documents, cache_dir))

    return LazyVectorIndex(build)
