"""``NestLLM``: Nest decoding behind LlamaIndex's ``LLM`` interface, for ``Settings.llm``.

An LLM only sees a prompt, but Nest needs passages to copy from. Inside a stock query engine
(``Settings.llm = NestLLM()``, then ``index.as_query_engine()``) the prompt already holds the
retrieved context: :mod:`.stock_prompt` reads the context block and the ``Query:`` line of
the stock templates back out, so Nest decodes over exactly the nodes the engine retrieved and
post-processed (no second retrieval), with the question as its prompt, as
:class:`NestQueryEngine` does. Context chunks are mapped back to node ids through the
engine's own ``RetrievalEndEvent``; text no retrieved node covers is cited as ``context-<n>``.

The spans reach ``Response.metadata["nest_spans"]`` (and ``nest_matches``, ``nest_stats``...)
through LlamaIndex's instrumentation, the one channel from an LLM call to the engine's
``Response``: see :mod:`.span_bridge` (an event handler registered once, when the first
``NestLLM`` is built). Called directly, :meth:`complete` also returns them in
``CompletionResponse.additional_kwargs``.

A prompt without a stock context block is answered over passages from ``retriever`` when one
is given (the question is the ``Query: ...`` line when present, else the whole prompt), else
by the plain LM with a warning (no passages, no citations).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.schema import NodeWithScore

from nest_core.config import NestConfig
from nest_core.prompts import find_question
from nest_integrations.llama_index import span_bridge
from nest_integrations.llama_index._runtime import LazyDecoder, decode_pieces
from nest_integrations.llama_index.nodes import nodes_to_passages, response_metadata
from nest_integrations.llama_index.stock_prompt import context_nodes, parse_stock_prompt

logger = logging.getLogger(__name__)


def retrieval_query(prompt: str) -> str:
    """The question inside a stock QA prompt, else the labelled question of any other
    template (:func:`~nest_core.prompts.find_question`: a ``Query: ...`` or ``Question: ...``
    line), else the prompt itself."""
    parsed = parse_stock_prompt(prompt)
    if parsed is not None:
        return parsed.question
    return find_question(prompt, min_context=0).text


@dataclass
class _Plan:
    """What one call decodes: the LM prompt, and the nodes to copy from (maybe to fetch)."""

    prompt: str
    nodes: list[NodeWithScore] | None  # None: ask the retriever for ``query``
    query: str


class NestLLM(CustomLLM):
    """A text-completion LLM that decodes with Nest over the context in its prompt (stock
    engines) or over passages from ``retriever``; spans reach the engine's ``Response``."""

    retriever: BaseRetriever | None = Field(
        default=None, description="Queried only for prompts without a stock context block "
        "(direct complete() calls); inside stock engines the prompt's context is used.")
    model_name: str | None = Field(
        default=None, description="HF id, local dir or .gguf path; None = bundled SmolLM2.")
    dtype: str | None = Field(default=None, description="'float32' (default) or 'bfloat16'.")
    config: NestConfig | None = Field(
        default=None, description="Decoder settings; None = defaults calibrated for the model "
        "(nest_core.config.default_config).")
    max_new_tokens: int = Field(default=128, gt=0, description="Completion length, tokens.")
    context_window: int = Field(
        default=8192, gt=0, description="Prompt budget reported to LlamaIndex's prompt "
        "helper (SmolLM2: 8192). Not read from the model, which loads lazily.")
    stop: list[str] | None = Field(default=None, description="Stop strings (not included).")
    datastore_dir: Path | None = Field(
        default=None, description="Directory of a persistent SpanDatastore for passage keys.")

    _decoder: LazyDecoder = PrivateAttr()

    def __init__(self, *, lm: Any = None, key_cache: Any = None, **data: Any) -> None:
        """``lm``/``key_cache`` are injected as is; nothing is loaded here. The span bridge
        (an instrumentation handler, see :mod:`.span_bridge`) is registered once."""
        super().__init__(**data)
        self._decoder = LazyDecoder(model_name=self.model_name, dtype=self.dtype,
                                    config=self.config, lm=lm, key_cache=key_cache,
                                    datastore_dir=self.datastore_dir)
        span_bridge.install()

    @classmethod
    def class_name(cls) -> str:
        return "NestLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           is_chat_model=False, model_name=self.model_name or "SmolLM2-135M")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any,
                 ) -> CompletionResponse:
        plan = self._plan(prompt)
        nodes = plan.nodes if plan.nodes is not None else self._retrieve(plan.query)
        return self._complete_over(plan.prompt, nodes)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any,
                        ) -> CompletionResponseGen:
        """The plan and the pending completion are made now (the engine's
        ``SynthesizeEndEvent`` comes before the stream is read); decoding runs lazily."""
        plan = self._plan(prompt)
        nodes = plan.nodes if plan.nodes is not None else self._retrieve(plan.query)
        completion, pieces = self._start(plan.prompt, nodes, streaming=True)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield CompletionResponse(text=text, delta=piece,
                                         additional_kwargs=completion.metadata)
            yield CompletionResponse(text=text, delta="", additional_kwargs=completion.metadata)
        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any,
                        ) -> CompletionResponse:
        """Retrieval (``aretrieve``, if any) on the loop; decoding in a worker thread."""
        plan = self._plan(prompt)
        nodes = plan.nodes if plan.nodes is not None else await self._aretrieve(plan.query)
        await asyncio.to_thread(self._decoder.get)  # the first call loads the model
        completion, pieces = self._start(plan.prompt, nodes, streaming=False)
        text = await asyncio.to_thread("".join, pieces)
        completion.text.append(text)
        # set here, in the caller's context: a value set in the worker thread is not seen
        span_bridge.remember(completion)
        return CompletionResponse(text=text, additional_kwargs=completion.metadata)

    # --- internals -------------------------------------------------------------------------
    def _plan(self, prompt: str) -> _Plan:
        parsed = parse_stock_prompt(prompt)
        if parsed is not None:
            return _Plan(prompt=parsed.question, query=parsed.question,
                         nodes=context_nodes(parsed.context, span_bridge.recent_nodes()))
        if self.retriever is None:
            return _Plan(prompt=prompt, query=prompt, nodes=[])
        return _Plan(prompt=prompt, query=retrieval_query(prompt), nodes=None)

    def _retrieve(self, query: str) -> list[NodeWithScore]:
        assert self.retriever is not None
        return self.retriever.retrieve(query)

    async def _aretrieve(self, query: str) -> list[NodeWithScore]:
        assert self.retriever is not None
        return await self.retriever.aretrieve(query)

    def _complete_over(self, prompt: str, nodes: Sequence[NodeWithScore],
                       ) -> CompletionResponse:
        completion, pieces = self._start(prompt, nodes, streaming=False)
        completion.text.append("".join(pieces))
        span_bridge.remember(completion)
        return CompletionResponse(text=completion.text[0],
                                  additional_kwargs=completion.metadata)

    def _start(self, prompt: str, nodes: Sequence[NodeWithScore], *, streaming: bool,
               ) -> tuple[span_bridge.Completion, Iterator[str]]:
        """The completion record (remembered now when streaming) and its lazy pieces."""
        passages, kept = nodes_to_passages(nodes)
        if not passages:
            logger.warning("NestLLM: no context block in the prompt and no retriever nodes; "
                           "decoding without passages (plain LM, no attribution)")
        completion = span_bridge.Completion(metadata=response_metadata(kept),
                                            streaming=streaming)
        if streaming:
            span_bridge.remember(completion)
        pieces = decode_pieces(self._decoder.get(), prompt, passages, kept,
                               completion.metadata, max_new_tokens=self.max_new_tokens,
                               stop=self.stop, citation_markers=False)
        return completion, pieces
