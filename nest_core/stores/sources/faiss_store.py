"""A FAISS index plus a sidecar of passages, on disk in our own format (never pickle).

Directory layout (``FaissStore.open(path)`` reads it, ``save()`` writes it atomically)::

    nest_faiss.json   header: format, dim, kind, metric, embedding name and weights
                      fingerprint, row count, params
    index.faiss       the FAISS index (faiss.write_index); row r is the r-th vector added
    passages.jsonl    one JSON object per row: {"row", "id", "text", "title", "metadata"}
                      (a replaced passage keeps its row as {"row", "id", "deleted": true})
    nest_spans/       the span datastore kept next to the store (see nest_core.stores.datastore)
    nest.lock         held (``flock``) by a writer: :meth:`FaissStore.writing`

Writers take the lock for their whole read-modify-write (:meth:`FaissStore.writing`, as
:func:`nest_core.stores.ingest.ingest` does), so two ``nest index`` runs into one store wait
for each other and the second adds to what the first saved instead of overwriting it.
Temporary files left by a save that was killed are removed when a writer takes the lock, or
when a store is opened while no writer holds it.

Flat (exact), IVF (``nlist`` cells, ``nprobe`` searched) and HNSW (graph) indexes share one
code path; rows are never renumbered, because HNSW cannot remove vectors. Re-adding a passage
with the same id and text is a no-op; a changed text tombstones the old row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nest_core.stores.embeddings import (
    EmbeddingDimensionError,
    EmbeddingFunction,
    check_same_model,
    embed_texts,
    resolve_embedding,
    warn_other_name,
)
from nest_core.stores.locking import exclusive_lock, lock_if_free
from nest_core.stores.sources.base import EmptyStoreError, SyncPassageSource, check_query
from nest_core.types import Passage

logger = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
META_FILE, INDEX_FILE, SIDECAR_FILE = "nest_faiss.json", "index.faiss", "passages.jsonl"
LOCK_FILE = "nest.lock"
TEMP_PREFIX = ".tmp-"  # files :meth:`FaissStore.save` writes, then renames into place
FORMAT_VERSION = 1
FAISS_INSTALL_HINT = 'pip install "nest-decoding[faiss]"'
_MIN_POINTS_PER_CELL = 39  # FAISS warns below this many training points per IVF cell


@dataclass
class FaissStoreMeta:
    """The header file: what a reader needs to trust the index and query it correctly."""

    dim: int
    kind: str = "flat"
    embedding: str | None = None
    embedding_fingerprint: str | None = None  # SHA-256 of the model's files (see embeddings)
    rows: int = 0
    nlist: int | None = None  # IVF cells (chosen from the first batch when None)
    nprobe: int = 16  # IVF cells searched per query
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_search: int = 64  # HNSW search breadth
    format: int = FORMAT_VERSION


class FaissStore:
    """Vectors in a FAISS inner-product index (vectors L2-normalised: cosine similarity),
    passages in a JSONL sidecar, rows aligned. Thread-safe; build with :meth:`create` or
    :meth:`open`."""

    def __init__(self, path: str | os.PathLike[str], meta: FaissStoreMeta, index: Any,
                 records: list[dict[str, Any]]) -> None:
        self.path = Path(path)
        self.meta = meta
        self.index = index  # None until the first add for IVF (it needs training vectors)
        self._records = records
        self._by_id = {r["id"]: i for i, r in enumerate(records) if not r.get("deleted")}
        self._lock = threading.RLock()
        self._disk = _signature(self.path)  # the saved state this object holds

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike[str], dim: int, *, kind: IndexKind = "flat",
               embedding: str | None = None, nlist: int | None = None, hnsw_m: int = 32,
               overwrite: bool = False, embedding_fingerprint: str | None = None
               ) -> FaissStore:
        """An empty store at ``path`` (written on the first :meth:`save`)."""
        faiss = _faiss()
        if kind not in INDEX_KINDS:
            msg = f"kind={kind!r} is not one of {INDEX_KINDS}"
            raise ValueError(msg)
        if dim < 1:
            msg = f"dim={dim} must be positive (the embedding size, e.g. 384 for MiniLM)"
            raise ValueError(msg)
        path = Path(path)
        if (path / META_FILE).exists() and not overwrite:
            msg = (f"a FAISS store already exists at {path}; open it with FaissStore.open(path) "
                   f"or pass overwrite=True to replace it")
            raise FileExistsError(msg)
        meta = FaissStoreMeta(dim=dim, kind=kind, embedding=embedding, nlist=nlist,
                              hnsw_m=hnsw_m, embedding_fingerprint=embedding_fingerprint)
        index = None
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        return cls(path, meta, index, [])

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FaissStore:
        """Load a store; a sidecar that lacks rows the index has is an error, not a guess."""
        faiss = _faiss()
        path = Path(path)
        if not (path / META_FILE).is_file():
            msg = (f"no FAISS store at {path} (missing {META_FILE}); create one with "
                   f"FaissStore.create(path, dim) or `nest index`")
            raise FileNotFoundError(msg)
        raw = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT_VERSION:
            msg = f"{path / META_FILE} has format {raw.get('format')}, expected {FORMAT_VERSION}"
            raise ValueError(msg)
        known = set(FaissStoreMeta.__dataclass_fields__)
        meta = FaissStoreMeta(**{k: v for k, v in raw.items() if k in known})
        index = faiss.read_index(str(path / INDEX_FILE)) if (path / INDEX_FILE).exists() else None
        records = _read_sidecar(path / SIDECAR_FILE)
        ntotal = 0 if index is None else int(index.ntotal)
        _check_alignment(path, ntotal, records, meta)
        with lock_if_free(path / LOCK_FILE) as free:
            if free:  # no writer is saving: a temporary file is the leftover of a killed one
                _remove_temp_files(path)
        return cls(path, meta, index, records[:ntotal])

    @classmethod
    def open_or_create(cls, path: str | os.PathLike[str], dim: int, **kwargs: Any) -> FaissStore:
        """:meth:`open` the store at ``path`` (its dim must match), else :meth:`create` one."""
        if (Path(path) / META_FILE).is_file():
            store = cls.open(path)
            if store.dim != dim:
                raise EmbeddingDimensionError(store_dim=store.dim, embed_dim=dim,
                                              embedding=kwargs.get("embedding"),
                                              store=f"the FAISS store at {path}",
                                              recorded=store.meta.embedding)
            return store
        return cls.create(path, dim, **kwargs)

    # --- reading -----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.meta.dim

    def __len__(self) -> int:
        """Live passages (replaced rows excluded)."""
        return len(self._by_id)

    def get(self, passage_id: str) -> Passage | None:
        row = self._by_id.get(passage_id)
        return None if row is None else _passage(self._records[row], None)

    def contains(self, passage: Passage) -> bool:
        """True when a passage with this id and the same title and text is stored."""
        row = self._by_id.get(passage.id)
        return row is not None and _same_content(self._records[row], passage)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Passage]]:
        """Top-``k`` live passages for each query row of ``vectors`` ``(Q, dim)``, best first;
        ``Passage.score`` is the inner product (cosine similarity)."""
        queries = _normalise(np.ascontiguousarray(vectors, dtype=np.float32))  # [Q, d]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            msg = (f"query vectors of shape {queries.shape} do not match the store's dimension "
                   f"{self.dim}; query with the embedding model the store was built with")
            raise ValueError(msg)
        with self._lock:
            if not self._by_id:
                msg = (f"the FAISS store at {self.path} is empty; ingest documents first "
                       f"(nest_core.stores.ingest.ingest(documents, store) or `nest index`)")
                raise EmptyStoreError(msg)
            self._set_search_params()
            # Replaced rows still sit in the index: over-fetch until k live ones are found.
            fetch = min(k + len(self._records) - len(self._by_id), int(self.index.ntotal))
            while True:
                scores, rows = self.index.search(queries, fetch)  # [Q, fetch] each
                results = [self._live(s, r, k) for s, r in zip(scores, rows, strict=True)]
                if all(len(r) >= min(k, len(self._by_id)) for r in results) \
                        or fetch >= self.index.ntotal:
                    return results
                fetch = min(fetch * 2, int(self.index.ntotal))

    # --- writing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store's write lock for a read-modify-write: another process's writer waits
        (with a message) until this one leaves. On entry this object takes up what other
        writers saved since it was read, so nothing they added is overwritten."""
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path / LOCK_FILE, f"the FAISS store at {self.path}"):
            with self._lock:
                self._reload()
            _remove_temp_files(self.path)
            yield

    def _reload(self) -> None:
        """Re-read the store from disk when another writer saved it since this object did."""
        if _signature(self.path) == self._disk or not (self.path / META_FILE).is_file():
            return
        fresh = FaissStore.open(self.path)
        if fresh.dim != self.dim:
            raise EmbeddingDimensionError(store_dim=fresh.dim, embed_dim=self.dim,
                                          embedding=self.meta.embedding,
                                          store=f"the FAISS store at {self.path}",
                                          recorded=fresh.meta.embedding)
        logger.info("FAISS store %s was saved by another writer; continuing from its %d "
                    "passages", self.path, len(fresh))
        self.meta, self.index, self._records = fresh.meta, fresh.index, fresh._records
        self._by_id, self._disk = fresh._by_id, fresh._disk

    def add(self, passages: Sequence[Passage], vectors: np.ndarray) -> int:
        """Add passages with their vectors ``(N, dim)``; unchanged ones are skipped, changed
        ones replace the old row. Returns the number of rows written (call :meth:`save`)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(passages):
            msg = f"got {vectors.shape} vectors for {len(passages)} passages; pass one per passage"
            raise ValueError(msg)
        if len(passages) and vectors.shape[1] != self.dim:
            msg = (f"embedding dimension {vectors.shape[1]} does not match the store's "
                   f"dimension {self.dim}; use the embedding model the store was built with")
            raise ValueError(msg)
        ids = [p.id for p in passages]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
            msg = f"duplicate passage ids in one batch {dupes}; ids must be unique"
            raise ValueError(msg)
        with self._lock:
            keep = [i for i, p in enumerate(passages) if not self.contains(p)]
            if not keep:
                return 0
            new = _normalise(vectors[keep])  # [n, d]
            self._ensure_index(new)
            for i in keep:
                old = self._by_id.get(passages[i].id)
                if old is not None:
                    self._records[old] = {"row": old, "id": passages[i].id, "deleted": True}
            start = len(self._records)
            self.index.add(new)
            for j, i in enumerate(keep):
                p = passages[i]
                self._records.append({"row": start + j, "id": p.id, "text": p.text,
                                      "title": p.title, "metadata": dict(p.metadata)})
                self._by_id[p.id] = start + j
            self.meta.rows = len(self._records)
            return len(keep)

    def delete(self, ids: Sequence[str]) -> int:
        """Tombstone passages by id (rows stay, unsearchable); returns how many were live."""
        with self._lock:
            removed = 0
            for pid in ids:
                row = self._by_id.pop(pid, None)
                if row is not None:
                    self._records[row] = {"row": row, "id": pid, "deleted": True}
                    removed += 1
            return removed

    def ids(self) -> list[str]:
        """Ids of the live passages, in row order."""
        return sorted(self._by_id, key=self._by_id.__getitem__)

    def passages(self) -> list[Passage]:
        """The live passages, in row order, as :meth:`search` returns them (no score)."""
        with self._lock:
            return [_passage(self._records[row], None) for row in sorted(self._by_id.values())]

    def save(self) -> None:
        """Write sidecar, index, then header, each atomically (a reader racing a save sees a
        sidecar at least as long as the index, which :meth:`open` accepts)."""
        with self._lock:
            self.path.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self._records)
            _atomic_write(self.path / SIDECAR_FILE, lines.encode("utf-8"))
            if self.index is not None:
                fd, tmp = _temp_file(self.path)
                os.close(fd)
                try:
                    _faiss().write_index(self.index, tmp)
                    os.replace(tmp, self.path / INDEX_FILE)
                finally:
                    Path(tmp).unlink(missing_ok=True)
            header = json.dumps(asdict(self.meta), indent=2).encode("utf-8")
            _atomic_write(self.path / META_FILE, header)
            self._disk = _signature(self.path)

    # --- internals ---------------------------------------------------------------------------
    def _ensure_index(self, first_batch: np.ndarray) -> None:
        """IVF is built and trained on the first batch (it needs data to place its cells)."""
        if self.index is not None:
            return
        faiss = _faiss()
        n = first_batch.shape[0]
        nlist = self.meta.nlist or max(1, min(int(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CELL))
        if nlist > n:
            msg = (f"IVF needs at least nlist={nlist} vectors in its first batch, got {n}; "
                   f"lower nlist or use kind='flat' for small stores")
            raise ValueError(msg)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(first_batch)
        self.meta.nlist = nlist
        self.index = index

    def _set_search_params(self) -> None:
        if self.meta.kind == "ivf":
            self.index.nprobe = min(self.meta.nprobe, self.meta.nlist or 1)
        elif self.meta.kind == "hnsw":
            self.index.hnsw.efSearch = self.meta.ef_search

    def _live(self, scores: np.ndarray, rows: np.ndarray, k: int) -> list[Passage]:
        out = []
        for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
            if row < 0 or self._records[row].get("deleted"):
                continue  # -1: fewer hits than asked (IVF cells not probed)
            out.append(_passage(self._records[row], float(score)))
            if len(out) == k:
                break
        return out


class FaissSource(SyncPassageSource):
    """A :class:`FaissStore` queried with an embedding function (default: bundled MiniLM)."""

    def __init__(self, store: FaissStore, *, embed: EmbeddingFunction | None = None) -> None:
        self.store = store
        self.embed = resolve_embedding(embed)
        warn_other_name(self.embed, store=f"the FAISS store at {store.path}",
                        recorded=store.meta.embedding,
                        recorded_fingerprint=store.meta.embedding_fingerprint)
        self._same_model = False  # checked on the first query, once its vector size matched

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *,
                  embed: EmbeddingFunction | None = None) -> FaissSource:
        return cls(FaissStore.open(path), embed=embed)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        check_query(query, k)
        if len(self.store) == 0:
            msg = (f"the FAISS store at {self.store.path} is empty; ingest documents first "
                   f"(nest_core.stores.ingest.ingest(documents, store) or `nest index`)")
            raise EmptyStoreError(msg)
        vectors = embed_texts(self.embed, [query], self.store.dim,
                              store=f"the FAISS store at {self.store.path}",
                              recorded=self.store.meta.embedding)
        if not self._same_model:
            check_same_model(self.embed, store=f"the FAISS store at {self.store.path}",
                             recorded=self.store.meta.embedding,
                             recorded_fingerprint=self.store.meta.embedding_fingerprint)
            self._same_model = True
        return self.store.search(vectors, k)[0]

    def passages(self) -> list[Passage]:
        """Every live passage, in row order (for precomputing the span datastore)."""
        return self.store.passages()


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as err:
        msg = f"faiss is needed for FAISS stores: `{FAISS_INSTALL_HINT}`"
        raise ImportError(msg) from err
    return faiss


def _read_sidecar(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"{path}:{n + 1} is not valid JSON ({err}); re-ingest to rebuild the store"
                raise ValueError(msg) from err
            records.append(rec)
    return records


def _check_alignment(path: Path, ntotal: int, records: list[dict[str, Any]],
                     meta: FaissStoreMeta) -> None:
    """Row r of the index must have sidecar record r: missing ones are named, never guessed."""
    present = {r.get("row") for r in records[:ntotal]}
    missing = [row for row in range(ntotal) if row not in present]
    if missing or len(records) < ntotal:
        missing = missing or list(range(len(records), ntotal))
        msg = (f"sidecar {path / SIDECAR_FILE} lacks entries for {len(missing)} index id(s) "
               f"(first: {missing[:5]}); the index and sidecar are out of step. Rebuild the "
               f"store: FaissStore.create(path, dim, overwrite=True) and re-ingest")
        raise ValueError(msg)
    if len(records) > ntotal:
        logger.warning("sidecar %s has %d rows beyond the index (an interrupted save); ignoring "
                       "them", path / SIDECAR_FILE, len(records) - ntotal)
    if ntotal and any(r.get("row") != i for i, r in enumerate(records[:ntotal])):
        msg = f"sidecar {path / SIDECAR_FILE} rows are out of order; re-ingest to rebuild it"
        raise ValueError(msg)
    if meta.dim < 1:
        msg = f"{path / META_FILE} has dim={meta.dim}; the store header is corrupted"
        raise ValueError(msg)


def _passage(record: dict[str, Any], score: float | None) -> Passage:
    return Passage(id=record["id"], text=record["text"], title=record.get("title"),
                   metadata=record.get("metadata") or {}, score=score)


def _same_content(record: dict[str, Any], passage: Passage) -> bool:
    return record.get("text") == passage.text and record.get("title") == passage.title


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms == 0, 1.0, norms), dtype=np.float32)


def _temp_file(folder: Path) -> tuple[int, str]:
    """A new file in ``folder`` (a descriptor open for writing, its path), readable by the
    group and others as the umask allows (``tempfile.mkstemp`` makes 0600 files, so a store
    shared read-only with other users could not be read by them)."""
    for _ in range(100):
        tmp = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    msg = f"could not create a temporary file in {folder}"
    raise FileExistsError(msg)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = _temp_file(path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _signature(path: Path) -> tuple[int, int, int] | None:
    """Which save of the store at ``path`` is on disk (every save replaces the header file)."""
    try:
        st = (path / META_FILE).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _remove_temp_files(path: Path) -> None:
    """Temporary files of a save that never finished (the process was killed): the next
    writer would never reuse them, and they can be larger than the index."""
    for tmp in path.glob(f"{TEMP_PREFIX}*"):
        try:
            tmp.unlink()
            logger.info("removed %s, left by an interrupted save", tmp)
        except OSError as err:  # a read-only store: leave it
            logger.debug("could not remove %s: %s", tmp, err)
