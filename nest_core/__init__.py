"""nest: Nearest Neighbor Speculative Decoding (Li et al., NeurIPS 2024) for any HF causal LM.

Grounded, attributed, faster answers over the passages your vector store returns.
Names are imported lazily (PEP 562), so ``import nest_core.types`` or an integration's import
does not pay for torch and transformers until a model is actually used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "NestConfig": "config",
    "NestDecoder": "decoder",
    "EncodedPassage": "encoding", "KeyCache": "encoding", "MemoryKeyCache": "encoding",
    "PassageEncoder": "encoding",
    "LanguageModel": "lm",
    "match_spans": "matching",
    "cache_dir": "models", "default_gguf_path": "models", "load_model": "models",
    "DecodeStats": "types", "NestChunk": "types", "NestResult": "types", "Passage": "types",
    "Span": "types",
    # the stores wing
    "SpanDatastore": "stores.datastore", "clear_cache": "stores.datastore",
    "HashingEmbeddings": "stores.embeddings",
    "SentenceTransformerEmbeddings": "stores.embeddings",
    "default_embedding_function": "stores.embeddings",
    "Document": "stores.ingest", "chunk_document": "stores.ingest", "ingest": "stores.ingest",
    "open_chroma_collection": "stores.ingest", "open_faiss_store": "stores.ingest",
    "ChromaSource": "stores.sources", "EmptyStoreError": "stores.sources",
    "FaissSource": "stores.sources", "FaissStore": "stores.sources",
    "InMemorySource": "stores.sources", "PassageSource": "stores.sources",
}

__all__ = [
    "ChromaSource",
    "DecodeStats",
    "Document",
    "EmptyStoreError",
    "EncodedPassage",
    "FaissSource",
    "FaissStore",
    "HashingEmbeddings",
    "InMemorySource",
    "KeyCache",
    "LanguageModel",
    "MemoryKeyCache",
    "NestChunk",
    "NestConfig",
    "NestDecoder",
    "NestResult",
    "Passage",
    "PassageEncoder",
    "PassageSource",
    "SentenceTransformerEmbeddings",
    "Span",
    "SpanDatastore",
    "__version__",
    "cache_dir",
    "chunk_document",
    "clear_cache",
    "default_embedding_function",
    "default_gguf_path",
    "ingest",
    "load_model",
    "match_spans",
    "open_chroma_collection",
    "open_faiss_store",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'nest_core' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f"nest_core.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from nest_core.config import NestConfig
    from nest_core.decoder import NestDecoder
    from nest_core.encoding import EncodedPassage, KeyCache, MemoryKeyCache, PassageEncoder
    from nest_core.lm import LanguageModel
    from nest_core.matching import match_spans
    from nest_core.models import cache_dir, default_gguf_path, load_model
    from nest_core.stores.datastore import SpanDatastore, clear_cache
    from nest_core.stores.embeddings import (
        HashingEmbeddings,
        SentenceTransformerEmbeddings,
        default_embedding_function,
    )
    from nest_core.stores.ingest import (
        Document,
        chunk_document,
        ingest,
        open_chroma_collection,
        open_faiss_store,
    )
    from nest_core.stores.sources import (
        ChromaSource,
        EmptyStoreError,
        FaissSource,
        FaissStore,
        InMemorySource,
        PassageSource,
    )
    from nest_core.types import DecodeStats, NestChunk, NestResult, Passage, Span
