"""A chromadb collection as a passage source: embedded (``PersistentClient``) or a server
(``HttpClient`` against ``chroma run``), the path past one machine's memory.

We always send vectors: chromadb's default embedding function downloads a model on first use,
which fails offline and silently differs from the model the collection was built with.
Collections written by LangChain (``langchain_chroma.Chroma``: collection ``langchain``) or
LlamaIndex (``ChromaVectorStore``) work too: the text is the ``documents`` field, ``_``-prefixed
bookkeeping keys (``_node_content``, ``_node_type``) are stripped from metadata, and the title
is read from ``metadata["title"]`` when present. Such collections record no embedding model,
so the store's dimension is read from one stored vector to catch a mismatched query model.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nest_core.stores.embeddings import (
    EmbeddingDimensionError,
    EmbeddingFunction,
    check_same_model,
    embed_texts,
    embedding_fingerprint,
    embedding_name,
    resolve_embedding,
    warn_other_name,
)
from nest_core.stores.sources.base import (
    EmptyStoreError,
    SyncPassageSource,
    check_query,
    public_metadata,
)
from nest_core.types import Passage

logger = logging.getLogger(__name__)

CHROMA_INSTALL_HINT = 'pip install "nest-decoding[chroma]"'
DEFAULT_COLLECTION = "nest"
EMBEDDING_KEY, DIM_KEY = "nest:embedding", "nest:dim"  # collection metadata we write
SQLITE_FILE = "chroma.sqlite3"
FINGERPRINT_KEY = "nest:embedding_sha256"  # the model's weights (embedding_fingerprint)


def chroma_module() -> Any:
    try:
        import chromadb
    except ImportError as err:
        msg = f"chromadb is needed for Chroma stores: `{CHROMA_INSTALL_HINT}`"
        raise ImportError(msg) from err
    return chromadb


def persistent_client(path: str | os.PathLike[str]) -> Any:
    """An embedded Chroma database stored under ``path``."""
    return chroma_module().PersistentClient(path=str(path))


def reading_client(path: str | os.PathLike[str]) -> Any:
    """An embedded Chroma database at ``path`` opened to be read, on a read-only filesystem
    too: chromadb always opens its sqlite file for writing ("attempt to write a readonly
    database"), so a database this process cannot write is copied to a private temporary
    folder (removed at exit) and read there. Nothing is ever written back."""
    folder = Path(path)
    sqlite = folder / SQLITE_FILE
    if not sqlite.is_file() or (os.access(folder, os.W_OK) and os.access(sqlite, os.W_OK)):
        return persistent_client(folder)
    copy = Path(tempfile.mkdtemp(prefix="nest-chroma-ro-"))
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    shutil.copytree(folder, copy / "db", ignore=shutil.ignore_patterns("*.lock"))
    for item in (copy / "db").rglob("*"):  # copies keep the read-only mode bits
        item.chmod(item.stat().st_mode | stat.S_IWUSR)
    (copy / "db").chmod(0o700)
    logger.info("Chroma database %s is read-only here; reading a private copy at %s", folder,
                copy / "db")
    return persistent_client(copy / "db")


DEFAULT_TIMEOUT = 30.0  # seconds a Chroma server may take to answer one call


def with_deadline(call: Callable[[], Any], timeout: float | None, where: str) -> Any:
    """``call()``, or a ``TimeoutError`` after ``timeout`` seconds (``None``: no limit).

    The call runs in a daemon thread, so a server that never answers holds neither the
    caller nor the interpreter's exit; the abandoned call ends when its socket does.
    """
    if timeout is None:
        return call()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the caller below
            box["error"] = err

    worker = threading.Thread(target=run, name="nest-chroma-call", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        msg = (f"the Chroma server ({where}) did not answer within {timeout:g} s; check that "
               f"it is running and not overloaded (or pass a larger timeout=)")
        raise TimeoutError(msg)
    if "error" in box:
        raise box["error"]
    return box["value"]


def http_client(host: str = "127.0.0.1", port: int = 8000, *, ssl: bool = False,
                headers: dict[str, str] | None = None) -> Any:
    """A client of a running Chroma server; a clear ``ConnectionError`` when none answers."""
    try:
        return chroma_module().HttpClient(host=host, port=port, ssl=ssl, headers=headers)
    except ValueError as err:  # chromadb's "Could not connect to a Chroma server"
        msg = (f"no Chroma server answers at {host}:{port} ({err}). Start one with "
               f"`chroma run --path <DIR> --host {host} --port {port}`, or use "
               f"ChromaSource.from_path(<DIR>) for an embedded database")
        raise ConnectionError(msg) from err


def get_collection(client: Any, name: str = DEFAULT_COLLECTION, *, create: bool = False,
                   embed: EmbeddingFunction | None = None, dim: int | None = None) -> Any:
    """A collection with no embedding function attached (we always pass vectors).

    ``create=True`` makes it when missing, cosine space, recording the embedding name and
    dimension in its metadata so later queries with another model are caught.
    """
    if not create:
        try:
            return client.get_collection(name, embedding_function=None)
        except Exception as err:  # chromadb raises NotFoundError / ValueError by version
            if "does not exist" not in str(err) and "not found" not in str(err).lower():
                raise
            known = collection_names(client)
            msg = (f"Chroma collection {name!r} does not exist (collections: {known}); name "
                   f"one of those (--collection NAME, collection= in Python), or ingest "
                   f"documents into {name!r} first (nest_core.stores.ingest or `nest index`)")
            raise EmptyStoreError(msg) from err
    metadata: dict[str, Any] = {"hnsw:space": "cosine"}
    if embed is not None:
        metadata[EMBEDDING_KEY] = embedding_name(embed)
        fingerprint = embedding_fingerprint(embed)
        if fingerprint:
            metadata[FINGERPRINT_KEY] = fingerprint
    if dim is not None:
        metadata[DIM_KEY] = int(dim)
    return client.get_or_create_collection(name, embedding_function=None, metadata=metadata)


def collection_names(client: Any) -> list[str]:
    """Names of the collections in a Chroma database, sorted."""
    return sorted(str(getattr(c, "name", c)) for c in client.list_collections())


def choose_collection(client: Any, name: str | None, where: str = "the Chroma database"
                      ) -> tuple[str, str | None]:
    """``(collection name, note)``: ``name`` when given; else ``nest`` when present, else the
    only collection there is (the note says so: LangChain names its ``langchain``, LlamaIndex
    users name theirs). Several and none named is an error listing them."""
    if name is not None:
        return name, None
    names = collection_names(client)
    if DEFAULT_COLLECTION in names:
        return DEFAULT_COLLECTION, None
    if len(names) == 1:
        return names[0], f"using the only Chroma collection in {where}: {names[0]!r}"
    if not names:
        msg = (f"{where} holds no Chroma collections; ingest documents first "
               f"(nest_core.stores.ingest or `nest index`)")
        raise EmptyStoreError(msg)
    msg = (f"{where} holds {len(names)} Chroma collections {names}; name one with "
           f"--collection NAME (collection= in Python)")
    raise EmptyStoreError(msg)


class ChromaSource(SyncPassageSource):
    """Top-k passages from a chromadb collection; ``Passage.score`` is Chroma's distance
    (lower is closer), ``Passage.title`` comes from ``metadata["title"]``."""

    def __init__(self, collection: Any, *, embed: EmbeddingFunction | None = None,
                 timeout: float | None = None) -> None:
        self.collection = collection
        # seconds a server may take per call (chromadb's own HTTP client never gives up)
        self.timeout = timeout
        self.embed = resolve_embedding(embed)
        self.note: str | None = None  # said to the user when the collection was picked for them
        meta = getattr(collection, "metadata", None) or {}
        # None until read from a stored vector (collections LangChain/LlamaIndex wrote)
        self.dim: int | None = int(meta[DIM_KEY]) if DIM_KEY in meta else None
        built_with = meta.get(EMBEDDING_KEY)
        self.recorded: str | None = str(built_with) if built_with else None
        self.fingerprint: str | None = meta.get(FINGERPRINT_KEY) or None
        warn_other_name(self.embed, store=f"Chroma collection {collection.name!r}",
                        recorded=self.recorded, recorded_fingerprint=self.fingerprint)
        self._same_model = False  # checked on the first query, once its vector size matched

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], collection: str | None = None, *,
                  embed: EmbeddingFunction | None = None) -> ChromaSource:
        """An existing collection of an embedded Chroma database at ``path`` (written by
        nest, LangChain or LlamaIndex). ``collection=None``: ``nest``, else the only one
        there is (``source.note`` says which); a missing name lists those that exist."""
        client = reading_client(path)
        name, note = choose_collection(client, collection, str(path))
        source = cls(get_collection(client, name), embed=embed)
        if note:
            logger.info("%s", note)
            source.note = note
        return source

    @classmethod
    def from_server(cls, host: str = "127.0.0.1", port: int = 8000,
                    collection: str = DEFAULT_COLLECTION, *,
                    embed: EmbeddingFunction | None = None, ssl: bool = False,
                    headers: dict[str, str] | None = None,
                    timeout: float | None = DEFAULT_TIMEOUT) -> ChromaSource:
        """An existing collection on a Chroma server (``chroma run --path DIR --port P``).

        Connecting and every query give up after ``timeout`` seconds with a
        ``TimeoutError`` (``None``: wait for ever), since a frozen server would otherwise
        hold the caller for ever: chromadb's HTTP client has no timeout."""
        where = f"{host}:{port}"
        col = with_deadline(lambda: get_collection(http_client(host, port, ssl=ssl,
                                                               headers=headers), collection),
                            timeout, where)
        return cls(col, embed=embed, timeout=timeout)

    def __len__(self) -> int:
        return int(with_deadline(self.collection.count, self.timeout, self.collection.name))

    def store_dim(self) -> int | None:
        """The collection's vector size: recorded by nest, else read from one stored vector
        (``None`` while the collection is empty)."""
        if self.dim is None:
            got = with_deadline(lambda: self.collection.get(limit=1, include=["embeddings"]),
                                self.timeout, self.collection.name)
            vectors = got.get("embeddings")
            if vectors is not None and len(vectors):
                self.dim = len(vectors[0])
        return self.dim

    def passages(self, page: int = 1000) -> list[Passage]:
        """Every passage of the collection (for precomputing its span datastore); the same
        :class:`Passage` objects :meth:`retrieve` returns, without scores."""
        out: list[Passage] = []
        offset = 0

        def read() -> Any:
            return self.collection.get(include=["documents", "metadatas"], limit=page,
                                       offset=offset)

        while True:
            got = with_deadline(read, self.timeout, self.collection.name)
            metas = got["metadatas"] or [None] * len(got["ids"])
            for pid, doc, meta in zip(got["ids"], got["documents"], metas, strict=True):
                if doc and doc.strip():
                    out.append(_passage(pid, doc, meta, None))
            if len(got["ids"]) < page:
                return out
            offset += page

    def retrieve(self, query: str, k: int) -> list[Passage]:
        check_query(query, k)
        vector = embed_texts(self.embed, [query], self.store_dim(),
                             store=f"Chroma collection {self.collection.name!r}",
                             recorded=self.recorded)
        if not self._same_model:
            check_same_model(self.embed, store=f"Chroma collection {self.collection.name!r}",
                             recorded=self.recorded, recorded_fingerprint=self.fingerprint)
            self._same_model = True
        def ask() -> Any:
            # Chroma fails on a k past its integer range; no store returns more than it holds
            n = max(1, min(k, self.collection.count()))
            return self.collection.query(query_embeddings=vector.tolist(), n_results=n,
                                         include=["documents", "metadatas", "distances"])

        try:
            res = with_deadline(ask, self.timeout, self.collection.name)
        except TimeoutError:
            raise
        except Exception as err:
            raise translate_chroma_error(err, self.collection.name) from err
        ids = res["ids"][0]
        if not ids:
            if self.collection.count() == 0:
                msg = (f"Chroma collection {self.collection.name!r} is empty; ingest documents "
                       f"first (nest_core.stores.ingest.ingest(documents, collection) or "
                       f"`nest index`)")
                raise EmptyStoreError(msg)
            return []
        docs, metas, dists = res["documents"][0], res["metadatas"][0], res["distances"][0]
        out = []
        for pid, doc, meta, dist in zip(ids, docs, metas, dists, strict=True):
            if not doc or not doc.strip():
                logger.warning("Chroma passage %r has no text; skipped", pid)
                continue
            out.append(_passage(pid, doc, meta, float(dist)))
        return out


def _passage(pid: Any, doc: str, meta: Any, score: float | None) -> Passage:
    """A stored record as a passage: bookkeeping keys dropped, title from the metadata."""
    metadata = public_metadata(meta)
    title = metadata.get("title")
    return Passage(id=str(pid), text=doc, title=title if isinstance(title, str) and title
                   else None, metadata=metadata, score=score)


_DIMS = re.compile(r"dimension of (\d+), got (\d+)")


def translate_chroma_error(err: Exception, name: str) -> Exception:
    """chromadb's errors, restated with the fix."""
    text = str(err)
    dims = _DIMS.search(text)
    if dims:
        return EmbeddingDimensionError(store_dim=int(dims[1]), embed_dim=int(dims[2]),
                                       store=f"Chroma collection {name!r}")
    if "dimension" in text:
        msg = (f"Chroma collection {name!r} rejected the query vector: {text}. Query with the "
               f"embedding model the collection was built with, or re-ingest it")
        return ValueError(msg)
    if "connect" in text.lower():
        msg = (f"lost the Chroma server ({text}); is `chroma run` still running at the "
               f"client's host and port?")
        return ConnectionError(msg)
    return err
