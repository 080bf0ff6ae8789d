"""``NestQueryEngine``: a LlamaIndex query engine that answers with Nest and cites spans.

Swap it in where a ``RetrieverQueryEngine`` stood: it returns the same ``Response`` shape
(``source_nodes`` and ``metadata={node_id: node.metadata}``) plus ``metadata["nest_spans"]``,
the exact character ranges of the answer that were copied from each node, and
``metadata["nest_matches"]``, the ranges the LM wrote itself that a node holds verbatim.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore

from nest_core.config import NestConfig
from nest_core.types import Passage
from nest_integrations.llama_index._runtime import LazyDecoder, decode_pieces
from nest_integrations.llama_index.nodes import nodes_to_passages, response_metadata

logger = logging.getLogger(__name__)


class NestRetrievalError(RuntimeError):
    """The retriever failed, or gave no node with text to decode over."""


class NestQueryEngine(CustomQueryEngine):
    """Retrieve nodes, then decode with Nearest Neighbor Speculative Decoding over them.

    The question is the prompt; the retrieved nodes become the token datastore Nest copies
    spans from (and, with ``config.passages_in_prompt``, background in the prompt too).
    ``metadata["nest_spans"]`` entries carry ``out_start``/``out_end`` (into the returned
    response text, markers included), ``node_id``, ``ref_doc_id``, ``source_index`` (1-based
    into ``source_nodes``), ``cited_text``, ``src_start``/``src_end`` (into the node text)
    and ``doc_start``/``doc_end`` when the node knows its ``start_char_idx``, and
    ``kind="copied"``. ``metadata["nest_matches"]`` entries have the same fields with
    ``kind="matched"`` (text the LM wrote that the node holds verbatim; the token range is
    0/0). They are filled when decoding ends, and get no ``[n]`` marker.

    ``source_nodes`` are the retrieved nodes Nest decoded over (nodes without text are
    skipped with a warning). Metadata keys starting with ``_`` (LlamaIndex bookkeeping such
    as ``_node_content``) are left out of ``metadata``.
    """

    retriever: BaseRetriever = Field(description="Where passages come from (any retriever).")
    model_name: str | None = Field(
        default=None, description="HF id, local dir or .gguf path; None = bundled SmolLM2.")
    dtype: str | None = Field(
        default=None, description="'float32' (default) or 'bfloat16' (faster on CPU).")
    config: NestConfig | None = Field(
        default=None, description="Decoder settings (paper symbols documented in "
        "nest_core.config); None = the defaults calibrated for the model.")
    max_new_tokens: int = Field(default=128, gt=0, description="Answer length limit, tokens.")
    stop: list[str] | None = Field(default=None, description="Stop strings (not included).")
    system_prompt: str | None = Field(
        default=None, description="Optional system message placed before the question.")
    streaming: bool = Field(
        default=False, description="Return a StreamingResponse whose metadata fills while "
        "its generator runs.")
    citation_markers: bool = Field(
        default=False, description="Insert CitationQueryEngine-style ' [n]' after each "
        "copied span (n indexes source_nodes from 1); offsets then index the marked text "
        "and metadata['nest_text'] holds the unmarked text.")
    title_key: str | None = Field(
        default="title", description="Node metadata key used as the passage title.")
    datastore_dir: Path | None = Field(
        default=None, description="Directory of a persistent SpanDatastore for passage keys "
        "(default: an in-memory cache per engine).")

    _decoder: LazyDecoder = PrivateAttr()

    def __init__(self, *, lm: Any = None, key_cache: Any = None, **data: Any) -> None:
        """``lm`` (a built ``nest_core.LanguageModel``) and ``key_cache`` are injected as
        is; everything else is a pydantic field. Nothing is loaded here."""
        super().__init__(**data)
        self._decoder = LazyDecoder(model_name=self.model_name, dtype=self.dtype,
                                    config=self.config, lm=lm, key_cache=key_cache,
                                    datastore_dir=self.datastore_dir)

    # --- alternative constructors ---------------------------------------------------------
    @classmethod
    def from_index(cls, index: Any, *, similarity_top_k: int = 4,
                   **kwargs: Any) -> NestQueryEngine:
        """From a ``VectorStoreIndex`` (or any index with ``as_retriever``)."""
        return cls(retriever=index.as_retriever(similarity_top_k=similarity_top_k), **kwargs)

    @classmethod
    def from_vector_store(cls, vector_store: Any, *, embed_model: Any,
                          similarity_top_k: int = 4, **kwargs: Any) -> NestQueryEngine:
        """From a vector store that keeps node text (Chroma, Qdrant...). ``embed_model`` is
        required so that nothing falls back to LlamaIndex's OpenAI default.

        A FAISS store keeps vectors only: load its index with its ``StorageContext``
        (``load_index_from_storage``) and use :meth:`from_index`.
        """
        from llama_index.core import VectorStoreIndex

        if embed_model is None:
            msg = ("embed_model is required (LlamaIndex would fall back to OpenAI); e.g. "
                   "nest_integrations.llama_index.bundled_embedding()")
            raise ValueError(msg)
        if not getattr(vector_store, "stores_text", True):
            msg = (f"{type(vector_store).__name__} keeps vectors only (no node text); load "
                   f"the index with its docstore, e.g. load_index_from_storage("
                   f"StorageContext.from_defaults(vector_store=..., persist_dir=...), "
                   f"embed_model=...), then NestQueryEngine.from_index(index)")
            raise ValueError(msg)
        index = VectorStoreIndex.from_vector_store(vector_store, embed_model=embed_model)
        return cls.from_index(index, similarity_top_k=similarity_top_k, **kwargs)

    # --- queries --------------------------------------------------------------------------
    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        nodes = self._retrieve(query_str)
        passages, kept = self._passages(query_str, nodes)
        decoder = self._decoder.get()
        metadata = response_metadata(kept)
        pieces = self._pieces(decoder, query_str, passages, kept, metadata)
        if self.streaming:
            return StreamingResponse(response_gen=pieces, source_nodes=list(kept),
                                     metadata=metadata)
        return Response("".join(pieces), source_nodes=list(kept), metadata=metadata)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:
        """Truly async: ``aretrieve`` on the loop, model loading and decoding in a thread."""
        try:
            nodes = await self.retriever.aretrieve(query_str)
        except Exception as err:
            raise self._retrieval_error(query_str, err) from err
        passages, kept = self._passages(query_str, nodes)
        decoder = await asyncio.to_thread(self._decoder.get)
        metadata = response_metadata(kept)
        pieces = self._pieces(decoder, query_str, passages, kept, metadata)
        if self.streaming:
            return AsyncStreamingResponse(response_gen=_in_thread(pieces),
                                          source_nodes=list(kept), metadata=metadata)
        text = await asyncio.to_thread("".join, pieces)
        return Response(text, source_nodes=list(kept), metadata=metadata)

    # --- internals -------------------------------------------------------------------------
    def _retrieve(self, query_str: str) -> list[NodeWithScore]:
        try:
            return self.retriever.retrieve(query_str)
        except Exception as err:
            raise self._retrieval_error(query_str, err) from err

    def _retrieval_error(self, query_str: str, err: Exception) -> NestRetrievalError:
        msg = (f"{type(self.retriever).__name__} failed for query {query_str!r:.80}: "
               f"{type(err).__name__}: {err}")
        return NestRetrievalError(msg)

    def _passages(self, query_str: str, nodes: Sequence[NodeWithScore],
                  ) -> tuple[list[Passage], list[NodeWithScore]]:
        passages, kept = nodes_to_passages(nodes, title_key=self.title_key)
        if not passages:
            what = ("no nodes (is the index empty?)" if not nodes else
                    f"{len(nodes)} node(s), none with text (e.g. image nodes)")
            msg = (f"{type(self.retriever).__name__} returned {what} for query "
                   f"{query_str!r:.80}; Nest needs text passages to decode over")
            raise NestRetrievalError(msg)
        return passages, kept

    def _prompt(self, query_str: str) -> Any:
        if not self.system_prompt:
            return query_str
        return [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": query_str}]

    def _pieces(self, decoder: Any, query_str: str, passages: list[Passage],
                kept: list[NodeWithScore], metadata: dict[str, Any]) -> Iterator[str]:
        return decode_pieces(decoder, self._prompt(query_str), passages, kept, metadata,
                             max_new_tokens=self.max_new_tokens, stop=self.stop,
                             citation_markers=self.citation_markers)


async def _in_thread(pieces: Iterator[str]) -> AsyncIterator[str]:
    """Drive a blocking generator from a worker thread, one piece at a time."""
    done = object()
    while True:
        piece = await asyncio.to_thread(next, pieces, done)
        if piece is done:
            return
        yield piece  # type: ignore[misc]


__all__ = ["NestQueryEngine", "NestRetrievalError"]
