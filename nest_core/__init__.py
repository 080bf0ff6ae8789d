"""nest: Nearest Neighbor Speculative Decoding (Li et al., NeurIPS 2024) for any HF causal LM.

Grounded, attributed, faster answers over the passages your vector store returns.
"""

from nest_core.config import NestConfig
from nest_core.datastore import SpanDatastore, clear_cache
from nest_core.decoder import NestDecoder
from nest_core.embeddings import (
    HashingEmbeddings,
    SentenceTransformerEmbeddings,
    default_embedding_function,
)
from nest_core.encoding import EncodedPassage, KeyCache, MemoryKeyCache, PassageEncoder
from nest_core.ingest import (
    Document,
    chunk_document,
    ingest,
    open_chroma_collection,
    open_faiss_store,
)
from nest_core.lm import LanguageModel
from nest_core.models import cache_dir, default_gguf_path, load_model
from nest_core.sources import (
    ChromaSource,
    EmptyStoreError,
    FaissSource,
    FaissStore,
    InMemorySource,
    PassageSource,
)
from nest_core.types import DecodeStats, NestChunk, NestResult, Passage, Span

__version__ = "0.1.0"

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
    "open_chroma_collection",
    "open_faiss_store",
]
