"""How :func:`nest_core.stores.ingest.ingest` writes into each kind of store: a
:class:`FaissWriter` (under the store's write lock, saved at checkpoints) or a
:class:`ChromaWriter` (every upsert durable; calls to a server time out). Both mark the store
incomplete while an ingest runs, so an interrupted one is found and resumed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from nest_core.stores.embeddings import (
    EmbeddingFunction,
    embedding_fingerprint,
    embedding_name,
)
from nest_core.stores.sources.chroma import (
    DEFAULT_TIMEOUT,
    DIM_KEY,
    EMBEDDING_KEY,
    FINGERPRINT_KEY,
    ChromaSource,
    translate_chroma_error,
    with_deadline,
)
from nest_core.stores.sources.faiss_store import FaissStore
from nest_core.types import Passage

if TYPE_CHECKING:
    from nest_core.encoding import KeyCache

logger = logging.getLogger(__name__)

MARKER_FILE = "nest_incomplete.json"  # in a FAISS store's folder while an ingest runs
INCOMPLETE_KEY = "nest:incomplete"  # the same, in a Chroma collection's metadata


class FaissWriter:
    def __init__(self, store: FaissStore) -> None:
        self.store = store
        self.dim: int | None = store.dim

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return self.store.writing()

    def embedding(self) -> str | None:
        return self.store.meta.embedding if len(self.store) else None

    def fingerprint(self) -> str | None:
        return self.store.meta.embedding_fingerprint if len(self.store) else None

    def changed(self, batch: list[Passage]) -> list[Passage]:
        return [p for p in batch if not self.store.contains(p)]

    def write(self, batch: list[Passage], vectors: Any, embed: EmbeddingFunction) -> None:
        meta = self.store.meta
        if meta.embedding is None:
            meta.embedding = embedding_name(embed)
        if meta.embedding_fingerprint is None:  # a new store, or one written before they were
            meta.embedding_fingerprint = embedding_fingerprint(embed)
        self.store.add(batch, vectors)

    def remove_stale(self, doc_ids: list[str], keep: set[str]) -> int:
        prefixes = tuple(f"{d}#" for d in doc_ids)
        return self.store.delete([i for i in self.store.ids()
                                  if i.startswith(prefixes) and i not in keep])

    def remove_missing(self, prefixes: tuple[str, ...], present: set[str]) -> int:
        """Passages of documents under ``prefixes`` that are not in ``present``."""
        return self.store.delete([i for i in self.store.ids() if i.startswith(prefixes)
                                  and i.rsplit("#", 1)[0] not in present])

    def begin(self, note: str) -> None:
        self.store.path.mkdir(parents=True, exist_ok=True)
        (self.store.path / MARKER_FILE).write_text(note, encoding="utf-8")

    def checkpoint(self, quiet: bool = False) -> None:
        try:
            self.store.save()
        except Exception:
            if not quiet:
                raise
            logger.exception("could not save the FAISS store while stopping")

    def finish(self) -> None:
        self.store.save()
        (self.store.path / MARKER_FILE).unlink(missing_ok=True)

    def datastore(self) -> KeyCache:
        from nest_core.stores.datastore import SpanDatastore

        return SpanDatastore.for_store(self.store.path)


class ChromaWriter:
    def __init__(self, store: Any) -> None:
        collection = store.collection if isinstance(store, ChromaSource) else store
        if not callable(getattr(collection, "upsert", None)):
            msg = (f"store must be a FaissStore, a ChromaSource or a chromadb collection, got "
                   f"{type(store).__name__}")
            raise TypeError(msg)
        # a server may freeze: every call gives up after the source's timeout, or after
        # DEFAULT_TIMEOUT for a bare collection of a server (an embedded one never hangs)
        timeout = store.timeout if isinstance(store, ChromaSource) \
            else DEFAULT_TIMEOUT if is_remote(collection) else None
        self.collection = collection if timeout is None else TimedCollection(collection,
                                                                               timeout)
        meta = getattr(collection, "metadata", None) or {}
        self.dim: int | None = int(meta[DIM_KEY]) if DIM_KEY in meta else None

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to lock: Chroma serialises writers itself and every upsert is durable."""
        return contextlib.nullcontext()

    def embedding(self) -> str | None:
        meta = getattr(self.collection, "metadata", None) or {}
        name = meta.get(EMBEDDING_KEY)
        return str(name) if name and self.collection.count() else None

    def fingerprint(self) -> str | None:
        meta = getattr(self.collection, "metadata", None) or {}
        value = meta.get(FINGERPRINT_KEY)
        return str(value) if value and self.collection.count() else None

    def begin(self, note: str) -> None:
        self._mark(note)

    def checkpoint(self, quiet: bool = False) -> None:
        """Nothing to save: every upsert is already durable."""

    def _mark(self, note: str | None) -> None:
        """Set or clear the incomplete marker in the collection's metadata (``modify``
        replaces the metadata; the distance space lives in its configuration)."""
        meta = {k: v for k, v in (getattr(self.collection, "metadata", None) or {}).items()
                if not k.startswith("hnsw:")}
        meta[INCOMPLETE_KEY] = note or ""  # "": complete (Chroma refuses empty metadata)
        self.collection.modify(metadata=meta)

    def changed(self, batch: list[Passage]) -> list[Passage]:
        got = self.collection.get(ids=[p.id for p in batch], include=["documents", "metadatas"])
        have = {i: (doc, (m or {}).get("title"))
                for i, doc, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}
        return [p for p in batch if have.get(p.id) != (p.text, p.title)]

    def write(self, batch: list[Passage], vectors: Any, embed: EmbeddingFunction) -> None:
        try:
            self.collection.upsert(ids=[p.id for p in batch], embeddings=vectors.tolist(),
                                   documents=[p.text for p in batch],
                                   metadatas=[dict(p.metadata) for p in batch])
        except Exception as err:
            raise translate_chroma_error(err, self.collection.name) from err

    def remove_stale(self, doc_ids: list[str], keep: set[str]) -> int:
        stale: list[str] = []
        for start in range(0, len(doc_ids), 100):
            where: Any = {"doc_id": {"$in": doc_ids[start:start + 100]}}
            got = self.collection.get(where=where, include=[])
            stale.extend(i for i in got["ids"] if i not in keep)
        if stale:
            self.collection.delete(ids=stale)
        return len(stale)

    def remove_missing(self, prefixes: tuple[str, ...], present: set[str]) -> int:
        """Passages of documents under ``prefixes`` that are not in ``present`` (Chroma has
        no prefix filter: the ids are read in pages)."""
        stale: list[str] = []
        offset, page = 0, 1000
        while True:
            got = self.collection.get(include=["metadatas"], limit=page, offset=offset)
            for pid, meta in zip(got["ids"], got["metadatas"] or [], strict=False):
                doc_id = str((meta or {}).get("doc_id", pid.rsplit("#", 1)[0]))
                if doc_id.startswith(prefixes) and doc_id not in present:
                    stale.append(pid)
            if len(got["ids"]) < page:
                break
            offset += page
        if stale:
            self.collection.delete(ids=stale)
        return len(stale)

    def finish(self) -> None:
        self._mark(None)

    def datastore(self) -> KeyCache:
        from nest_core.stores.datastore import SpanDatastore

        return SpanDatastore()  # a collection does not reveal its directory


class TimedCollection:
    """A chromadb collection whose every method call raises ``TimeoutError`` after
    ``timeout`` seconds (:func:`~nest_core.stores.sources.chroma.with_deadline`)."""

    def __init__(self, collection: Any, timeout: float) -> None:
        self._collection, self._timeout = collection, timeout

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._collection, attr)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            return with_deadline(lambda: value(*args, **kwargs), self._timeout,
                                 f"collection {self._collection.name!r}")

        return call


def is_remote(collection: Any) -> bool:
    """Whether ``collection`` lives on a Chroma server (chromadb's HTTP client is FastAPI)."""
    return "FastAPI" in type(getattr(collection, "_client", None)).__name__


StoreWriter = FaissWriter | ChromaWriter
