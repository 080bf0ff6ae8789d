"""Open a vector-store directory, whoever wrote it: nest, LangChain or LlamaIndex.

The kind is read from the files in the directory (first match wins)::

    "faiss"            nest's own FAISS store (nest_faiss.json + index.faiss + passages.jsonl)
    "chroma"           an embedded Chroma database (chroma.sqlite3), written by nest,
                       langchain_chroma.Chroma or LlamaIndex's ChromaVectorStore
    "llama-index"      a LlamaIndex persist directory of a FaissVectorStore or of the
                       default SimpleVectorStore (default__vector_store.json + docstore.json
                       + index_store.json)
    "langchain-faiss"  a LangChain FAISS.save_local directory (index.faiss + index.pkl)

Where the span datastore of a store lives (:func:`span_datastore_dir`): inside the store
directory (``DIR/nest_spans``) when it already holds one or this process may write there, so
the keys travel with the store; else the user cache (``default_datastore_dir()``), which is
keyed by model and passage text, so any store's passages share it safely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nest_core.stores.embeddings import EmbeddingFunction
from nest_core.stores.sources.framework_faiss import (
    LANGCHAIN_INDEX,
    LANGCHAIN_PICKLE,
    LLAMA_DOCSTORE,
    LLAMA_VECTOR_FILE,
)

STORE_KINDS = ("faiss", "chroma", "llama-index", "langchain-faiss")
CHROMA_FILE = "chroma.sqlite3"


def detect_store_kind(path: str | os.PathLike[str]) -> str | None:
    """One of :data:`STORE_KINDS` from the files in ``path``, or ``None``."""
    from nest_core.stores.sources.faiss_store import META_FILE

    p = Path(path).expanduser()
    if (p / META_FILE).is_file():
        return "faiss"
    if (p / CHROMA_FILE).is_file():
        return "chroma"
    if (p / LLAMA_VECTOR_FILE).is_file() and (p / LLAMA_DOCSTORE).is_file():
        return "llama-index"
    if (p / LANGCHAIN_INDEX).is_file() and (p / LANGCHAIN_PICKLE).is_file():
        return "langchain-faiss"
    return None


def open_store(path: str | os.PathLike[str], *, collection: str | None = None,
               embed: EmbeddingFunction | None = None,
               allow_dangerous_deserialization: bool = False) -> Any:
    """The passage source of the store at ``path`` (see the module doc for the kinds).

    ``collection``: the Chroma collection (default ``nest``, else the only one there is).
    ``embed``: the query embedding; it must be the model the store was built with (default:
    the bundled all-MiniLM-L6-v2); a dimension mismatch raises
    :class:`~nest_core.stores.embeddings.EmbeddingDimensionError` on the first query.
    ``allow_dangerous_deserialization``: needed, and honoured, only for a LangChain
    ``save_local`` directory, whose docstore is a pickle.
    """
    from nest_core.stores.sources.chroma import ChromaSource
    from nest_core.stores.sources.faiss_store import FaissSource
    from nest_core.stores.sources.framework_faiss import LangChainFaissSource, LlamaIndexSource

    p = Path(path).expanduser()
    kind = detect_store_kind(p)
    if kind is None:
        what = "does not exist" if not p.exists() else "holds no vector store nest can read"
        msg = (f"{path} {what} (nest reads its own stores, Chroma directories, LlamaIndex "
               f"persist directories and LangChain FAISS.save_local directories)")
        raise FileNotFoundError(msg)
    if collection is not None and kind != "chroma":
        msg = f"collection={collection!r} applies to Chroma stores; {path} is a {kind} store"
        raise ValueError(msg)
    if kind == "faiss":
        return FaissSource.from_path(p, embed=embed)
    if kind == "chroma":
        return ChromaSource.from_path(p, collection, embed=embed)
    if kind == "llama-index":
        return LlamaIndexSource.from_persist_dir(p, embed=embed)
    return LangChainFaissSource.from_path(
        p, embed=embed, allow_dangerous_deserialization=allow_dangerous_deserialization)


def span_datastore_dir(path: str | os.PathLike[str]) -> Path:
    """Where the span datastore of the store at ``path`` lives (see the module doc)."""
    from nest_core.stores.datastore import datastore_dir_for, default_datastore_dir

    store = Path(path).expanduser()
    inside = datastore_dir_for(store)
    if inside.is_dir() or os.access(store, os.W_OK):
        return inside
    return default_datastore_dir()
