"""The stores wing: where passages and their precomputed keys live, apart from the algorithm.

- :mod:`~nest_core.stores.datastore`: the persistent span datastore (per-passage keys, values
  and token positions on disk, keyed by model and text hash).
- :mod:`~nest_core.stores.embeddings`: the retrieval embedding functions (loaded lazily).
- :mod:`~nest_core.stores.ingest`: documents -> chunks -> a Chroma collection or FAISS store,
  and the span datastore precomputed for them.
- :mod:`~nest_core.stores.ray_index`: the same precomputation on Ray workers.
- :mod:`~nest_core.stores.sources`: passage sources over Chroma, FAISS, LangChain/LlamaIndex
  stores on disk and memory, and the lexical re-ranker.

Imports run downward only: this wing may use the algorithm's low-level modules
(``types``, ``encoding``, ``lm``...) and never :mod:`nest_core.app`; the algorithm never
imports it. Nothing heavy (torch, transformers, chromadb, faiss) is imported here.
"""
