"""An in-memory passage source: a list of passages and an embedding function.

For small corpora, tests and demos: everything is embedded once at construction and searched
exactly (inner product on normalised vectors, i.e. cosine similarity).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from nest_core.stores.embeddings import EmbeddingFunction, embed_texts, resolve_embedding
from nest_core.stores.sources.base import (
    EmptyStoreError,
    SyncPassageSource,
    check_query,
    drop_empty,
    embedding_text,
)
from nest_core.types import Passage

logger = logging.getLogger(__name__)


class InMemorySource(SyncPassageSource):
    """Exact cosine search over passages held in memory.

    ``embed`` is any ``list[str] -> list[list[float]]`` (default: the bundled MiniLM).
    Passages with no text are skipped with a warning; ids must be unique.
    """

    def __init__(self, passages: Iterable[Passage] = (), *,
                 embed: EmbeddingFunction | None = None) -> None:
        self.embed = resolve_embedding(embed)
        self._passages: list[Passage] = []
        self._ids: set[str] = set()
        self._vectors: np.ndarray | None = None  # [N, d], L2-normalised
        self.add(passages)

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, embed: EmbeddingFunction | None = None,
                   titles: Iterable[str | None] | None = None) -> InMemorySource:
        """Passages ``p0, p1, ...`` from plain strings (titles optional, same order)."""
        texts = list(texts)
        title_list = list(titles) if titles is not None else [None] * len(texts)
        if len(title_list) != len(texts):
            msg = f"got {len(title_list)} titles for {len(texts)} texts; pass one per text"
            raise ValueError(msg)
        passages = [Passage(id=f"p{i}", text=t, title=title)
                    for i, (t, title) in enumerate(zip(texts, title_list, strict=True))]
        return cls(passages, embed=embed)

    def __len__(self) -> int:
        return len(self._passages)

    def add(self, passages: Iterable[Passage]) -> int:
        """Embed and add passages; returns how many were added."""
        batch = drop_empty(list(passages), "InMemorySource")
        seen: set[str] = set()
        dupes: set[str] = set()
        for p in batch:
            if p.id in self._ids or p.id in seen:
                dupes.add(p.id)
            seen.add(p.id)
        if dupes:
            msg = (f"duplicate passage ids {sorted(dupes)[:5]}; ids must be unique within a "
                   f"source")
            raise ValueError(msg)
        if not batch:
            return 0
        dim = None if self._vectors is None else self._vectors.shape[1]
        vectors = _normalise(embed_texts(self.embed, [embedding_text(p) for p in batch], dim))
        self._vectors = vectors if self._vectors is None else np.vstack([self._vectors, vectors])
        self._passages.extend(batch)
        self._ids.update(p.id for p in batch)
        return len(batch)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        check_query(query, k)
        if self._vectors is None:
            msg = "InMemorySource is empty: add passages first (InMemorySource(passages, ...))"
            raise EmptyStoreError(msg)
        q = _normalise(embed_texts(self.embed, [query], self._vectors.shape[1]))[0]  # [d]
        scores = self._vectors @ q  # [N]
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        # Stable order: best score first, ties by insertion order.
        top = top[np.lexsort((top, -scores[top]))]
        return [_with_score(self._passages[i], float(scores[i])) for i in top]


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def _with_score(p: Passage, score: float) -> Passage:
    return Passage(id=p.id, text=p.text, title=p.title, metadata=p.metadata, score=score)
