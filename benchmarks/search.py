"""Stage 1 for the benchmark: FOLDOC passages behind a passage search (MiniLM + exact FAISS).

The corpus vectors are computed once with the bundled all-MiniLM-L6-v2 and cached under
``<nest cache>/bench`` (keyed by a hash of the passage texts), so repeated runs only pay
for query embeddings and the search itself, which is what the latency split reports.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nest_core import Passage
from nest_core.embeddings import default_embedding_function, embed_texts
from nest_core.models import cache_dir

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


def corpus_vectors(passages: Sequence[Passage]) -> np.ndarray:
    """``(N, 384)`` float32 normalised MiniLM vectors of ``passages``, cached on disk."""
    path = cache_dir() / "bench" / f"foldoc-minilm-{corpus_digest(passages)}.npy"
    if path.is_file():
        return np.load(path)
    t0 = time.perf_counter()
    vectors = embed_texts(default_embedding_function(), [passage_text(p) for p in passages])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    Path(tmp).replace(path)
    logger.info("embedded %d passages in %.0f s", len(passages), time.perf_counter() - t0)
    return vectors


class FlatSearch:
    """Exact inner-product search over the cached vectors (faiss ``IndexFlatIP``)."""

    name = "faiss-flat (local)"

    def __init__(self, passages: Sequence[Passage]) -> None:
        import faiss

        self.passages = list(passages)
        vectors = corpus_vectors(self.passages)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.embed = default_embedding_function()

    def search(self, query: str, k: int) -> SearchResult:
        t0 = time.perf_counter()
        q = embed_texts(self.embed, [query])
        _scores, rows = self.index.search(q, k)
        found = [self.passages[int(r)] for r in rows[0] if r >= 0]
        return SearchResult(passages=found, seconds=time.perf_counter() - t0)
