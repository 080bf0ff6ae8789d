"""Stage 1 for the benchmark: a corpus's passages (FOLDOC, iso-codes) in the product's own
stores (FAISS, Chroma).

The corpus vectors are computed once with the bundled all-MiniLM-L6-v2 and cached under
``<nest cache>/bench/<corpus>-minilm-<hash>.npy`` (keyed by a hash of the passage texts).
:func:`open_stores` ingests the passages into a FAISS flat store and an embedded Chroma
collection through :func:`nest_core.stores.ingest.ingest` (idempotent: later runs write nothing),
under ``<nest cache>/bench/stores-<hash>``, serving the cached vectors instead of
re-embedding. Queries then go through the real
:class:`~nest_core.stores.sources.FaissSource` /
:class:`~nest_core.stores.sources.ChromaSource`, and their time (query embedding + vector
search) is the "passage search" of the latency split.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nest_core import Passage
from nest_core.models import cache_dir
from nest_core.stores.embeddings import default_embedding_function, embed_texts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    passages: list[Passage]
    seconds: float  # query embedding + vector search


def passage_text(p: Passage) -> str:
    """What is embedded: title and text, as the LM also reads them."""
    return f"{p.title}\n{p.text}" if p.title else p.text


def corpus_digest(passages: Sequence[Passage]) -> str:
    h = hashlib.sha256()
    for p in passages:
        h.update(p.id.encode())
        h.update(passage_text(p).encode("utf-8"))
    return h.hexdigest()[:16]


def corpus_vectors(passages: Sequence[Passage], corpus: str = "foldoc") -> np.ndarray:
    """``(N, 384)`` float32 normalised MiniLM vectors of ``passages``, cached on disk."""
    path = cache_dir() / "bench" / f"{corpus}-minilm-{corpus_digest(passages)}.npy"
    if path.is_file():
        return np.load(path)
    t0 = time.perf_counter()
    vectors = embed_texts(default_embedding_function(), [passage_text(p) for p in passages])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    Path(tmp).replace(path)
    logger.info("embedded %d %s passages in %.0f s", len(passages), corpus,
                time.perf_counter() - t0)
    return vectors


class CachedEmbeddings:
    """The default embedder, except that corpus texts return their cached vectors (so
    ingesting 15k passages into two stores costs one embedding pass, done once)."""

    def __init__(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        self.inner = default_embedding_function()
        self.name = self.inner.name
        self.cached = {passage_text(p): i for i, p in enumerate(passages)}
        self.vectors = vectors

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = [self.cached.get(t) for t in texts]
        if all(r is not None for r in rows):
            return self.vectors[rows]
        return np.asarray(self.inner(texts), dtype=np.float32)


class SourceSearch:
    """A product passage source, timed; passages come back with their store ids."""

    def __init__(self, name: str, source: Any) -> None:
        self.name = name
        self.source = source

    def search(self, query: str, k: int) -> SearchResult:
        t0 = time.perf_counter()
        found = self.source.retrieve(query, k)
        return SearchResult(passages=found, seconds=time.perf_counter() - t0)


def open_stores(passages: Sequence[Passage], root: Path | None = None, corpus: str = "foldoc"
                ) -> dict[str, SourceSearch]:
    """``passages`` (of the named ``corpus``) in a FAISS flat store and a Chroma collection,
    ingested on first use; the stores' directory is keyed by the passages' hash."""
    from nest_core.stores.ingest import Document, ingest, open_chroma_collection, open_faiss_store
    from nest_core.stores.sources import ChromaSource, FaissSource
    from nest_core.stores.sources.rerank import LexicalRerank

    root = root or cache_dir() / "bench" / f"stores-{corpus_digest(passages)}"
    embed = CachedEmbeddings(passages, corpus_vectors(passages, corpus))
    # One document per passage: the ingest chunker keeps a <=100-word document whole.
    docs = [Document(text=p.text, title=p.title, id=p.id, metadata=dict(p.metadata))
            for p in passages]
    faiss_store = open_faiss_store(root / "faiss", embed=embed)
    ingest(docs, faiss_store, embed=embed, progress=False, batch_size=512)
    collection = open_chroma_collection(root / "chroma", embed=embed)
    ingest(docs, collection, embed=embed, progress=False, batch_size=512)
    # as `nest ask` retrieves: the store's 200 nearest, re-ranked by the question's words
    return {"faiss": SourceSearch("FAISS flat",
                                  LexicalRerank(FaissSource(faiss_store, embed=embed))),
            "chroma": SourceSearch("Chroma (embedded)",
                                   LexicalRerank(ChromaSource(collection, embed=embed)))}
