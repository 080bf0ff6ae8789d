"""Vector stores that LlamaIndex and LangChain persisted, read without either framework.

LlamaIndex (``FaissVectorStore`` + ``storage_context.persist(persist_dir)``)::

    default__vector_store.json   the FAISS index: binary (faiss.write_index) despite the name
    docstore.json                {"docstore/data": {node_id: {"__data__": {"text", "metadata",
                                 ...}}}}: the node texts
    index_store.json             {"index_store/data": {index_id: {"__data__": "<JSON string
                                 with nodes_dict: {faiss row: node_id}>"}}}

LlamaIndex's default ``SimpleVectorStore`` persists the same files, but its
``default__vector_store.json`` is JSON (``{"embedding_dict": {node_id: vector}}``, searched by
cosine): those vectors go into an in-memory FAISS index. Only faiss and json read either
layout, so opening one is safe.

LangChain (``FAISS.save_local(folder)``)::

    index.faiss   the FAISS index
    index.pkl     a pickle of (docstore, {faiss row: docstore id})

Unpickling runs whatever code the file names, so the pickle is refused unless the caller
passes ``allow_dangerous_deserialization=True``: the same explicit opt-in LangChain's own
``FAISS.load_local`` demands. nest never sets it for the user.

Neither format records the embedding model, so a query vector of another size is caught
before FAISS sees it (FAISS would fail with a bare ``AssertionError``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from nest_core.stores.embeddings import EmbeddingFunction, embed_texts, resolve_embedding
from nest_core.stores.sources.base import (
    EmptyStoreError,
    SyncPassageSource,
    UnsafeStoreError,
    check_query,
    public_metadata,
)
from nest_core.types import Passage

logger = logging.getLogger(__name__)

LLAMA_VECTOR_FILE, LLAMA_DOCSTORE, LLAMA_INDEX_STORE = (
    "default__vector_store.json", "docstore.json", "index_store.json")
LANGCHAIN_INDEX, LANGCHAIN_PICKLE = "index.faiss", "index.pkl"
LANGCHAIN_INSTALL_HINT = "pip install langchain-community"
OPT_IN = ("--allow-dangerous-deserialization on the command line, "
          "allow_dangerous_deserialization=True in Python")


class RowFaissSource(SyncPassageSource):
    """A FAISS index whose row ``r`` is passage ``rows[r]`` (``None``: a row with no text).

    ``Passage.score`` is FAISS's raw score: squared L2 distance (lower is closer) for L2
    indexes, inner product for IP ones; the order is FAISS's either way.
    """

    def __init__(self, index: Any, rows: list[Passage | None], *,
                 embed: EmbeddingFunction | None = None, where: str = "the FAISS index") -> None:
        if int(index.ntotal) != len(rows):
            msg = (f"{where}: the index holds {int(index.ntotal)} vectors but its docstore maps "
                   f"{len(rows)} rows; the files are out of step: persist the store again")
            raise ValueError(msg)
        self.index = index
        self.rows = rows
        self.embed = resolve_embedding(embed)
        self.where = where
        self.dim = int(index.d)
        self.note: str | None = None
        self.normalize_queries = False  # True where the store searches by cosine

    def __len__(self) -> int:
        return sum(p is not None for p in self.rows)

    def passages(self) -> list[Passage]:
        """Every passage, in row order (for precomputing the span datastore)."""
        return [p for p in self.rows if p is not None]

    def retrieve(self, query: str, k: int) -> list[Passage]:
        check_query(query, k)
        if len(self) == 0:
            msg = f"{self.where} is empty; add documents to it with the framework that wrote it"
            raise EmptyStoreError(msg)
        vector = embed_texts(self.embed, [query], self.dim, store=self.where)  # [1, d]
        if self.normalize_queries:
            vector = _unit(vector)
        fetch = min(k + len(self.rows) - len(self), len(self.rows))  # rows without text skip
        scores, ids = self.index.search(np.ascontiguousarray(vector), fetch)  # [1, fetch] each
        out = []
        for score, row in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
            passage = self.rows[row] if 0 <= row < len(self.rows) else None
            if passage is not None:
                out.append(Passage(id=passage.id, text=passage.text, title=passage.title,
                                   metadata=passage.metadata, score=float(score)))
            if len(out) == k:
                break
        return out


class LlamaIndexSource(RowFaissSource):
    """A LlamaIndex persist directory (``FaissVectorStore`` or the default
    ``SimpleVectorStore``): safe, no pickle involved."""

    @classmethod
    def from_persist_dir(cls, path: str | os.PathLike[str], *,
                         embed: EmbeddingFunction | None = None) -> LlamaIndexSource:
        path = Path(path)
        for name in (LLAMA_VECTOR_FILE, LLAMA_DOCSTORE, LLAMA_INDEX_STORE):
            if not (path / name).is_file():
                msg = (f"{path} is not a LlamaIndex persist directory (missing {name}); "
                       f"write it with storage_context.persist(persist_dir=...)")
                raise FileNotFoundError(msg)
        nodes = _read_json(path / LLAMA_DOCSTORE).get("docstore/data") or {}
        cosine = not is_binary_faiss(path / LLAMA_VECTOR_FILE)
        if cosine:
            index, row_ids = simple_vector_index(path / LLAMA_VECTOR_FILE)
        else:
            index = _faiss().read_index(str(path / LLAMA_VECTOR_FILE))
            row_ids = llama_row_ids(_read_json(path / LLAMA_INDEX_STORE), path)
        rows: list[Passage | None] = [None] * int(index.ntotal)
        for row, node_id in row_ids.items():
            if row >= len(rows):
                msg = (f"{path / LLAMA_INDEX_STORE} maps FAISS row {row} but the index holds "
                       f"{len(rows)} vectors; persist the store again")
                raise ValueError(msg)
            node = nodes.get(node_id)
            if node is None:
                logger.warning("%s: node %s of row %d is not in docstore.json; skipped",
                               path, node_id, row)
                continue
            rows[row] = llama_passage(node_id, node.get("__data__") or {})
        kind = "SimpleVectorStore" if cosine else "FAISS"
        source = cls(index, rows, embed=embed, where=f"the LlamaIndex {kind} store at {path}")
        source.normalize_queries = cosine
        return source


class LangChainFaissSource(RowFaissSource):
    """A LangChain ``FAISS.save_local`` directory; its docstore is a pickle (see module doc)."""

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, embed: EmbeddingFunction | None = None,
                  allow_dangerous_deserialization: bool = False,
                  index_name: str = "index") -> LangChainFaissSource:
        path = Path(path)
        index_file, pickle_file = path / f"{index_name}.faiss", path / f"{index_name}.pkl"
        for file in (index_file, pickle_file):
            if not file.is_file():
                msg = (f"{path} is not a LangChain FAISS directory (missing {file.name}); "
                       f"write it with FAISS.save_local(folder)")
                raise FileNotFoundError(msg)
        if allow_dangerous_deserialization is not True:
            msg = (f"{pickle_file} is a Python pickle (LangChain's FAISS docstore), and "
                   f"unpickling runs any code the file contains; nest refuses it by default. "
                   f"If you wrote this store or trust whoever did, opt in explicitly: {OPT_IN}")
            raise UnsafeStoreError(msg)
        docstore, row_ids = _unpickle_docstore(pickle_file)
        index = _faiss().read_index(str(index_file))
        rows: list[Passage | None] = [None] * int(index.ntotal)
        for row, doc_id in dict(row_ids).items():
            doc = docstore.search(doc_id)
            if not 0 <= int(row) < len(rows) or isinstance(doc, str):  # str: "ID not found"
                logger.warning("%s: row %s (%s) has no document; skipped", path, row, doc_id)
                continue
            rows[int(row)] = langchain_passage(str(doc_id), doc)
        return cls(index, rows, embed=embed, where=f"the LangChain FAISS store at {path}")


def simple_vector_index(path: Path) -> tuple[Any, dict[int, str]]:
    """A SimpleVectorStore's JSON vectors as a FAISS inner-product index of unit vectors
    (cosine, as LlamaIndex searches it) and ``{row: node id}``."""
    vectors = _read_json(path).get("embedding_dict")
    if not isinstance(vectors, dict):
        msg = (f"{path} is neither a FAISS index nor a LlamaIndex SimpleVectorStore (no "
               f"embedding_dict); persist the index again")
        raise ValueError(msg)
    if not vectors:
        msg = f"{path} holds no vectors; add documents to the LlamaIndex index first"
        raise EmptyStoreError(msg)
    ids = list(vectors)
    matrix = _unit(np.asarray([vectors[i] for i in ids], dtype=np.float32))  # [N, d]
    index = _faiss().IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    return index, dict(enumerate(ids))


def llama_row_ids(index_store: dict[str, Any], path: Path) -> dict[int, str]:
    """``{faiss row: node id}`` from the vector-store indexes of ``index_store.json``."""
    rows: dict[int, str] = {}
    for entry in (index_store.get("index_store/data") or {}).values():
        if entry.get("__type__") != "vector_store":
            continue
        data = entry.get("__data__")
        data = json.loads(data) if isinstance(data, str) else (data or {})
        for row, node_id in (data.get("nodes_dict") or {}).items():
            rows[int(row)] = str(node_id)
    if not rows:
        msg = (f"{path / LLAMA_INDEX_STORE} maps no FAISS rows to nodes (no vector_store index "
               f"with nodes); build it with VectorStoreIndex and persist it again")
        raise EmptyStoreError(msg)
    return rows


def llama_passage(node_id: str, data: dict[str, Any]) -> Passage | None:
    """A persisted LlamaIndex node as a passage (``None`` when it has no text)."""
    text = data.get("text")
    if text is None:  # newer nodes keep it in a resource
        text = (data.get("text_resource") or {}).get("text")
    if not isinstance(text, str) or not text.strip():
        return None
    metadata = public_metadata(data.get("metadata"))
    source = (data.get("relationships") or {}).get("1") or {}  # "1": the SOURCE document
    if isinstance(source, dict) and source.get("node_id"):
        metadata.setdefault("doc_id", str(source["node_id"]))
    title = metadata.get("title")
    return Passage(id=node_id, text=text, title=title if isinstance(title, str) and title
                   else None, metadata=metadata)


def langchain_passage(doc_id: str, doc: Any) -> Passage | None:
    """A LangChain ``Document`` as a passage (``None`` when it has no text)."""
    text = getattr(doc, "page_content", None)
    if not isinstance(text, str) or not text.strip():
        return None
    metadata = public_metadata(getattr(doc, "metadata", None))
    title = metadata.get("title")
    pid = getattr(doc, "id", None) or doc_id
    return Passage(id=str(pid), text=text, title=title if isinstance(title, str) and title
                   else None, metadata=metadata)


def is_binary_faiss(path: Path) -> bool:
    """FAISS index files start with a 4-byte type tag (``IxF2``, ``IHNf``, ...), never ``{``."""
    with path.open("rb") as fh:
        head = fh.read(4)
    return len(head) == 4 and head[:1] == b"I"


def _unpickle_docstore(path: Path) -> tuple[Any, dict[Any, str]]:
    """The caller opted in: load the pickle (which imports LangChain's classes itself)."""
    import pickle

    try:
        with path.open("rb") as fh:
            loaded = pickle.load(fh)  # the user passed the explicit opt-in
    except ModuleNotFoundError as err:
        msg = (f"{path} needs LangChain's classes to unpickle ({err.name} is missing): "
               f"`{LANGCHAIN_INSTALL_HINT}`")
        raise ImportError(msg) from err
    if not (isinstance(loaded, tuple) and len(loaded) == 2
            and callable(getattr(loaded[0], "search", None))):
        msg = (f"{path} does not hold LangChain's (docstore, id map) pair; was it written by "
               f"FAISS.save_local?")
        raise ValueError(msg)
    return loaded[0], loaded[1]


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms == 0, 1.0, norms), dtype=np.float32)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        msg = f"{path} is not valid JSON ({err}); persist the LlamaIndex store again"
        raise ValueError(msg) from err
    if not isinstance(data, dict):
        msg = f"{path} holds {type(data).__name__}, not a JSON object; persist the store again"
        raise ValueError(msg)
    return data


def _faiss() -> Any:
    from nest_core.stores.sources.faiss_store import _faiss as load

    return load()
