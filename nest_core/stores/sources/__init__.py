"""Passage sources (stage 1 of Nest): one protocol, framework-free adapters.

Chroma and FAISS adapters import their client libraries lazily, so importing this package
costs nothing beyond numpy. :func:`open_store` opens a store directory whoever wrote it
(nest, LangChain's Chroma or ``FAISS.save_local``, LlamaIndex's FAISS persist directory).
"""

from nest_core.stores.embeddings import EmbeddingDimensionError
from nest_core.stores.sources.base import (
    EmptyStoreError,
    PassageSource,
    SyncPassageSource,
    UnsafeStoreError,
)
from nest_core.stores.sources.chroma import ChromaSource
from nest_core.stores.sources.faiss_store import FaissSource, FaissStore
from nest_core.stores.sources.framework_faiss import LangChainFaissSource, LlamaIndexSource
from nest_core.stores.sources.memory import InMemorySource
from nest_core.stores.sources.open import detect_store_kind, open_store, span_datastore_dir

__all__ = [
    "ChromaSource",
    "EmbeddingDimensionError",
    "EmptyStoreError",
    "FaissSource",
    "FaissStore",
    "InMemorySource",
    "LangChainFaissSource",
    "LlamaIndexSource",
    "PassageSource",
    "SyncPassageSource",
    "UnsafeStoreError",
    "detect_store_kind",
    "open_store",
    "span_datastore_dir",
]
