"""``NestQueryEngine``: a LlamaIndex query engine that answers with Nest and cites spans.

Swap it in where a ``RetrieverQueryEngine`` stood: it returns the same ``Response`` shape
(``source_nodes`` and ``metadata={node_id: node.metadata}``) plus ``metadata["nest_spans"]``,
the exact character ranges of the answer that were copied from each node, and
``metadata["nest_matches"]``, the ranges the LM wrote itself that a node holds verbatim.

It behaves like the stock engine around the answer too: ``node_postprocessors`` run on the
retrieved nodes (sync and async), ``retrieve()`` / ``synthesize()`` work on their own, and the
same callback events (QUERY > RETRIEVE, SYNTHESIZE > LLM, for ``LlamaDebugHandler``) and
instrumentation events (``QueryStartEvent``, ``RetrievalStartEvent``,
``SynthesizeStartEvent``, ``LLMCompletionStartEvent`` and their ends) are emitted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, model_validator
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.query import QueryEndEvent, QueryStartEvent
from llama_index.core.instrumentation.events.synthesis import (
    SynthesizeEndEvent,
    SynthesizeStartEvent,
)
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, QueryType

from nest_core.async_iter import aiter_in_thread
from nest_core.config import NestConfig
from nest_core.types import Passage
from nest_integrations.llama_index._events import llm_events
from nest_integrations.llama_index._options import refuse_unsupported
from nest_integrations.llama_index._responses import PendingText, empty_answer
from nest_integrations.llama_index._runtime import LazyDecoder, decode_pieces
from nest_integrations.llama_index.nodes import nodes_to_passages, response_metadata

logger = logging.getLogger(__name__)
dispatcher = instrument.get_dispatcher(__name__)

DEFAULT_EMPTY_RESPONSE = "Empty Response"  # what stock synthesizers answer with no nodes


class NestRetrievalError(RuntimeError):
    """The retriever failed, or gave no node with text to decode over."""


class NestQueryEngine(CustomQueryEngine):
    """Retrieve nodes, post-process them, then decode with Nearest Neighbor Speculative
    Decoding over them.

    The question is the prompt; the retrieved nodes become the token datastore Nest copies
    spans from (and, with ``config.passages_in_prompt``, background in the prompt too).
    ``metadata["nest_spans"]`` entries carry ``out_start``/``out_end`` (into the returned
    response text, markers included), ``node_id``, ``ref_doc_id``, ``source_index`` (1-based
    into ``source_nodes``), ``cited_text``, ``src_start``/``src_end`` (into the node text)
    and ``doc_start``/``doc_end`` when the node knows its ``start_char_idx``, and
    ``kind="copied"``. ``metadata["nest_matches"]`` entries have the same fields with
    ``kind="matched"`` (text the LM wrote that the node holds verbatim; the token range is
    0/0). They are filled when decoding ends, and get no ``[n]`` marker.

    ``source_nodes`` are the post-processed nodes Nest decoded over (nodes without text are
    skipped with a warning). Metadata keys starting with ``_`` (LlamaIndex bookkeeping such
    as ``_node_content``) are left out of ``metadata``.

    When the retriever returns nothing, that is an error (an empty or broken index). When
    ``node_postprocessors`` drop every node (e.g. a ``SimilarityPostprocessor`` cutoff that
    nothing passes), the answer is ``empty_response`` with no source nodes and no spans, as
    the stock engines answer; with ``empty_response=None`` the LM answers on its own
    instead, and the response has no citations (nothing relevant was retrieved).

    Keyword arguments of ``as_query_engine`` that cannot apply to Nest (``llm``,
    ``response_mode`` other than ``"compact"``, prompt templates, ``response_synthesizer``,
    ``output_cls``...) are refused with a ``ValueError`` that says what to use instead;
    unknown names are refused by pydantic.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    retriever: BaseRetriever = Field(description="Where passages come from (any retriever).")
    node_postprocessors: list[BaseNodePostprocessor] = Field(
        default_factory=list, description="Applied in order to the retrieved nodes before "
        "decoding (similarity cutoffs, rerankers, metadata filters), as in "
        "RetrieverQueryEngine.")
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
    empty_response: str | None = Field(
        default=DEFAULT_EMPTY_RESPONSE, description="The answer when node_postprocessors "
        "leave no node (stock engines say 'Empty Response'); None = let the LM answer "
        "without passages (no citations).")

    _decoder: LazyDecoder = PrivateAttr()

    def __init__(self, *, lm: Any = None, key_cache: Any = None, **data: Any) -> None:
        """``lm`` (a built ``nest_core.LanguageModel``) and ``key_cache`` are injected as
        is; everything else is a pydantic field. Nothing is loaded here.

        An explicit ``callback_manager`` is also given to the node postprocessors (as
        ``RetrieverQueryEngine`` does). The engine's callback manager (explicit, or the
        handlers of ``Settings.callback_manager`` when the engine is built) is given to a
        retriever that has no handlers of its own (e.g. from an index built before the
        handler was set), so one ``LlamaDebugHandler`` sees the whole query.
        """
        explicit_cm = data.get("callback_manager")
        super().__init__(**data)
        self._decoder = LazyDecoder(model_name=self.model_name, dtype=self.dtype,
                                    config=self.config, lm=lm, key_cache=key_cache,
                                    datastore_dir=self.datastore_dir)
        if explicit_cm is not None:
            for post in self.node_postprocessors:
                post.callback_manager = explicit_cm
        own = getattr(self.retriever, "callback_manager", None)
        if self.callback_manager.handlers and (own is None or not own.handlers):
            self.retriever.callback_manager = self.callback_manager

    @model_validator(mode="before")
    @classmethod
    def _refuse_stock_only_options(cls, data: Any) -> Any:
        return refuse_unsupported(data, cls.__name__) if isinstance(data, dict) else data

    # --- alternative constructors ---------------------------------------------------------
    @classmethod
    def from_index(cls, index: Any, *, similarity_top_k: int = 4,
                   **kwargs: Any) -> NestQueryEngine:
        """From a ``VectorStoreIndex`` (or any index with ``as_retriever``), taking the
        keyword arguments ``index.as_query_engine`` takes: engine fields go to the engine,
        the rest (``filters``, ``vector_store_query_mode``...) to ``index.as_retriever``."""
        kwargs = refuse_unsupported(kwargs, cls.__name__)
        ours = {k: v for k, v in kwargs.items() if k in cls.model_fields or k in {"lm",
                                                                                  "key_cache"}}
        rest = {k: v for k, v in kwargs.items() if k not in ours}
        retriever = index.as_retriever(similarity_top_k=similarity_top_k, **rest)
        return cls(retriever=retriever, **ours)

    @classmethod
    def from_args(cls, retriever: BaseRetriever, **kwargs: Any) -> NestQueryEngine:
        """``RetrieverQueryEngine.from_args``'s signature: a retriever plus engine options."""
        return cls(retriever=retriever, **kwargs)

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

    # --- the stock engine's public steps ----------------------------------------------------
    def query(self, str_or_query_bundle: QueryType) -> RESPONSE_TYPE:
        return self._evented_query(_bundle(str_or_query_bundle), streaming=self.streaming)

    async def aquery(self, str_or_query_bundle: QueryType) -> RESPONSE_TYPE:
        """Truly async: ``aretrieve`` on the loop, model loading and decoding in a thread."""
        return await self._aevented_query(_bundle(str_or_query_bundle),
                                          streaming=self.streaming)

    def retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """The retriever's nodes after ``node_postprocessors`` (what would be decoded over)."""
        try:
            nodes = self.retriever.retrieve(query_bundle)
        except Exception as err:
            raise self._retrieval_error(query_bundle.query_str, err) from err
        self._check_retrieved(query_bundle.query_str, nodes)
        for post in self.node_postprocessors:
            nodes = post.postprocess_nodes(nodes, query_bundle=query_bundle)
        return nodes

    async def aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        try:
            nodes = await self.retriever.aretrieve(query_bundle)
        except Exception as err:
            raise self._retrieval_error(query_bundle.query_str, err) from err
        self._check_retrieved(query_bundle.query_str, nodes)
        for post in self.node_postprocessors:
            nodes = await post.apostprocess_nodes(nodes, query_bundle=query_bundle)
        return nodes

    def synthesize(self, query_bundle: QueryBundle, nodes: list[NodeWithScore],
                   additional_source_nodes: Sequence[NodeWithScore] | None = None,
                   ) -> RESPONSE_TYPE:
        """Decode an answer over ``nodes`` (no retrieval): a ``Response`` (or
        ``StreamingResponse``) like the stock synthesizer's, with Nest's span metadata.
        ``additional_source_nodes`` are appended to ``source_nodes`` (not decoded over)."""
        return self._synthesize(query_bundle, nodes, additional_source_nodes,
                                streaming=self.streaming, use_async=False)

    async def asynthesize(self, query_bundle: QueryBundle, nodes: list[NodeWithScore],
                          additional_source_nodes: Sequence[NodeWithScore] | None = None,
                          ) -> RESPONSE_TYPE:
        await self._aload(nodes)
        response = self._synthesize(query_bundle, nodes, additional_source_nodes,
                                    streaming=self.streaming, use_async=True)
        if isinstance(response, PendingText):
            return await response.run()
        return response

    # --- one query, with its events; streaming chosen per call (the chat engine's way) ------
    def _evented_query(self, bundle: QueryBundle, *, streaming: bool) -> RESPONSE_TYPE:
        dispatcher.event(QueryStartEvent(query=bundle))
        with self.callback_manager.as_trace("query"), self.callback_manager.event(
                CBEventType.QUERY, payload={EventPayload.QUERY_STR: bundle.query_str}) as ev:
            response = self._synthesize(bundle, self.retrieve(bundle), None,
                                        streaming=streaming, use_async=False)
            ev.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(QueryEndEvent(query=bundle, response=response))
        return response

    async def _aevented_query(self, bundle: QueryBundle, *, streaming: bool) -> RESPONSE_TYPE:
        dispatcher.event(QueryStartEvent(query=bundle))
        with self.callback_manager.as_trace("query"), self.callback_manager.event(
                CBEventType.QUERY, payload={EventPayload.QUERY_STR: bundle.query_str}) as ev:
            nodes = await self.aretrieve(bundle)
            await self._aload(nodes)
            response = self._synthesize(bundle, nodes, None, streaming=streaming,
                                        use_async=True)
            if isinstance(response, PendingText):
                response = await response.run()
            ev.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(QueryEndEvent(query=bundle, response=response))
        return response

    # --- CustomQueryEngine's hooks (kept for code that calls them directly) -----------------
    def custom_query(self, query_str: str) -> RESPONSE_TYPE:
        bundle = QueryBundle(query_str)
        return self.synthesize(bundle, self.retrieve(bundle))

    async def acustom_query(self, query_str: str) -> RESPONSE_TYPE:
        bundle = QueryBundle(query_str)
        return await self.asynthesize(bundle, await self.aretrieve(bundle))

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        return self.synthesize(query_bundle, self.retrieve(query_bundle))

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        return await self.asynthesize(query_bundle, await self.aretrieve(query_bundle))

    # --- internals -------------------------------------------------------------------------
    async def _aload(self, nodes: Sequence[NodeWithScore]) -> None:
        """Load the model in a worker thread (not on the event loop) if it will be used."""
        if nodes or self.empty_response is None:
            await asyncio.to_thread(self._decoder.get)

    def _synthesize(self, bundle: QueryBundle, nodes: Sequence[NodeWithScore],
                    extra: Sequence[NodeWithScore] | None, *, streaming: bool,
                    use_async: bool) -> Any:
        """SYNTHESIZE events around building the response; async non-streaming returns a
        :class:`PendingText` that decodes in a thread inside the same events."""
        dispatcher.event(SynthesizeStartEvent(query=bundle))
        event_id = self.callback_manager.on_event_start(
            CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: bundle.query_str})

        def done(response: RESPONSE_TYPE) -> RESPONSE_TYPE:
            self.callback_manager.on_event_end(
                CBEventType.SYNTHESIZE, payload={EventPayload.RESPONSE: response},
                event_id=event_id)
            dispatcher.event(SynthesizeEndEvent(query=bundle, response=response))
            return response

        query_str = bundle.query_str
        if nodes:
            passages, kept = self._passages(query_str, nodes)
        else:
            passages, kept = [], []
            if self.empty_response is not None:
                return done(empty_answer(self.empty_response, streaming, use_async, extra))
            logger.info("node_postprocessors left no node for %r: answering without "
                        "passages (no citations)", query_str[:80])
        metadata = response_metadata(kept)
        sources = list(kept) + list(extra or [])
        if use_async and not streaming:
            return PendingText(self, query_str, passages, kept, metadata, sources, done)
        pieces = self._pieces(self._decoder.get(), query_str, passages, kept, metadata,
                              hold=not streaming)
        if not streaming:
            return done(Response("".join(pieces), source_nodes=sources, metadata=metadata))
        if use_async:
            return done(AsyncStreamingResponse(response_gen=aiter_in_thread(lambda: pieces),
                                               source_nodes=sources, metadata=metadata))
        return done(StreamingResponse(response_gen=pieces, source_nodes=sources,
                                      metadata=metadata))

    def _check_retrieved(self, query_str: str, nodes: Sequence[NodeWithScore]) -> None:
        if not nodes:
            msg = (f"{type(self.retriever).__name__} returned no nodes (is the index empty?) "
                   f"for query {query_str!r:.80}; Nest needs text passages to decode over")
            raise NestRetrievalError(msg)

    def _retrieval_error(self, query_str: str, err: Exception) -> NestRetrievalError:
        msg = (f"{type(self.retriever).__name__} failed for query {query_str!r:.80}: "
               f"{type(err).__name__}: {err}")
        return NestRetrievalError(msg)

    def _passages(self, query_str: str, nodes: Sequence[NodeWithScore],
                  ) -> tuple[list[Passage], list[NodeWithScore]]:
        passages, kept = nodes_to_passages(nodes, title_key=self.title_key)
        if not passages:
            msg = (f"{type(self.retriever).__name__} returned {len(nodes)} node(s), none "
                   f"with text (e.g. image nodes) for query {query_str!r:.80}; Nest needs "
                   f"text passages to decode over")
            raise NestRetrievalError(msg)
        return passages, kept

    def _prompt(self, query_str: str) -> Any:
        if not self.system_prompt:
            return query_str
        return [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": query_str}]

    def _pieces(self, decoder: Any, query_str: str, passages: list[Passage],
                kept: list[NodeWithScore], metadata: dict[str, Any], *, hold: bool = False,
                ) -> Generator[str, None, None]:
        """The answer's pieces between the LLM events; ``hold`` for callers that join them
        (all text comes at the end, when its support is known)."""
        prompt = self._prompt(query_str)
        pieces = decode_pieces(decoder, prompt, passages, kept, metadata,
                               max_new_tokens=self.max_new_tokens, stop=self.stop,
                               citation_markers=self.citation_markers, hold=hold)
        return llm_events(pieces, callback_manager=self.callback_manager,
                          prompt=query_str if isinstance(prompt, str) else str(prompt),
                          model_name=self.model_name or decoder.lm.name,
                          metadata=lambda: metadata)


def _bundle(query: QueryType) -> QueryBundle:
    return query if isinstance(query, QueryBundle) else QueryBundle(str(query))


__all__ = ["DEFAULT_EMPTY_RESPONSE", "NestQueryEngine", "NestRetrievalError"]
