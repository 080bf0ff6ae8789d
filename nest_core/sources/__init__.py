"""Passage sources (stage 1 of Nest): one protocol, framework-free adapters.

Chroma and FAISS adapters import their client libraries lazily, so importing this package
costs nothing beyond numpy.
"""

from nest_core.sources.base import EmptyStoreError, PassageSource, SyncPassageSource
from nest_core.sources.chroma import ChromaSource
from nest_core.sources.faiss_store import FaissSource, FaissStore
from nest_core.sources.memory import InMemorySource

__all__ = [
    "ChromaSource",
    "EmptyStoreError",
    "FaissSource",
    "FaissStore",
    "InMemorySource",
    "PassageSource",
    "SyncPassageSource",
]
