"""``NestLLM``: Nest decoding behind LlamaIndex's ``LLM`` interface, for ``Settings.llm``.

An LLM only sees a prompt, but Nest needs passages to copy from. Inside a stock engine the
engine has them: every stock synthesizer (``index.as_query_engine()`` in any
``response_mode``, ``CitationQueryEngine``, and the chat engines ``index.as_chat_engine()``
in its default, ``"context"`` and ``"condense_plus_context"`` modes) is called with the
question and the retrieved, post-processed nodes, and :mod:`.span_bridge` reads both off
LlamaIndex's instrumentation. Nest then decodes over exactly those nodes (no second
retrieval) with the question as its prompt, as :class:`NestQueryEngine` does, whatever the
prompt template (a chat engine's system message, a refine prompt, numbered sources).

One synthesis is answered once, over all its nodes: refine and tree_summarize show the
nodes a chunk per LLM call, and a Nest answer over the last chunk alone would be the
answer to a narrower question (often wrong, and cited). Later calls of the same synthesis
get that answer again, as refine's "return the original answer". Inside
``CitationQueryEngine`` (nodes numbered "Source 1", "Source 2"...) the answer carries its
``[n]`` markers, as that engine's prompt asks. A chat engine's condense prompt is answered
by the deterministic rule of :mod:`.condense` (the 135M model rewrites questions badly),
and the follow-up's synthesis then decodes the standalone question.

The spans reach ``Response.metadata["nest_spans"]`` (and ``nest_matches``, ``nest_stats``...)
through LlamaIndex's instrumentation, the one channel from an LLM call to the engine's
``Response`` (and ``AgentChatResponse.metadata`` for chat engines): see :mod:`.span_bridge`.
Called directly, :meth:`complete` also returns them in ``CompletionResponse.additional_kwargs``.

Outside a stock synthesis, a prompt with a stock context block (dashes, ``Query:`` line)
is answered over that context (chunks mapped to nodes of the last retrieval, the rest cited
as ``context-<n>``); any other prompt over passages from ``retriever`` when one is given,
else by the plain LM, with one warning per ``NestLLM`` that names the fix.
"""

from __future__ import annotations

import asyncio
import logging
import re
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
from nest_integrations.llama_index.condense import condense_question
from nest_integrations.llama_index.nodes import (
    node_text,
    nodes_to_passages,
    response_metadata,
)
from nest_integrations.llama_index.stock_prompt import (
    context_nodes,
    parse_condense_prompt,
    parse_stock_prompt,
)

logger = logging.getLogger(__name__)

NO_PASSAGES = (
    "NestLLM found no passages to copy from: the prompt is not one a stock LlamaIndex engine "
    "built over retrieved nodes, and NestLLM has no retriever, so it answers as the plain LM "
    "with no citations. For cited answers use NestQueryEngine.from_index(index) (or "
    "NestChatEngine), or NestLLM(retriever=index.as_retriever()).")
_SOURCE_LABEL = re.compile(r"Source (\d+):\n")  # CitationQueryEngine's numbered nodes


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
    synthesis: span_bridge.Synthesis | None = None  # the stock synthesis it belongs to
    standalone: str | None = None  # a condense prompt's answer: nothing to decode


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
    _warned: bool = PrivateAttr(default=False)  # the no-passages warning is given once

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
        plan = self._plan(prompt, streaming=False)
        if plan.standalone is not None:
            return CompletionResponse(text=plan.standalone)
        again = _again(plan)
        if again is not None:
            return again
        nodes = plan.nodes if plan.nodes is not None else self._retrieve(plan.query)
        return self._complete_over(plan, nodes)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any,
                        ) -> CompletionResponseGen:
        """The plan and the pending completion are made now (the engine's
        ``SynthesizeEndEvent`` comes before the stream is read); decoding runs lazily."""
        plan = self._plan(prompt, streaming=True)
        if plan.standalone is not None:
            return _one_piece(plan.standalone, {})
        if plan.synthesis is not None and plan.synthesis.answer is not None:
            answer = plan.synthesis.answer
            span_bridge.remember(span_bridge.Completion(
                metadata=answer.metadata, streaming=True, text=list(answer.text)))
            return _one_piece("".join(answer.text), answer.metadata)
        nodes = plan.nodes if plan.nodes is not None else self._retrieve(plan.query)
        completion, pieces = self._start(plan, nodes, streaming=True)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield CompletionResponse(text=text, delta=piece,
                                         additional_kwargs=completion.metadata)
            completion.text.append(text)
            if plan.synthesis is not None:
                plan.synthesis.answer = completion
            yield CompletionResponse(text=text, delta="", additional_kwargs=completion.metadata)
        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any,
                        ) -> CompletionResponse:
        """Retrieval (``aretrieve``, if any) on the loop; decoding in a worker thread."""
        plan = self._plan(prompt, streaming=False)
        if plan.standalone is not None:
            return CompletionResponse(text=plan.standalone)
        again = _again(plan)
        if again is not None:
            return again
        nodes = plan.nodes if plan.nodes is not None else await self._aretrieve(plan.query)
        await asyncio.to_thread(self._decoder.get)  # the first call loads the model
        completion, pieces = self._start(plan, nodes, streaming=False)
        text = await asyncio.to_thread("".join, pieces)
        completion.text.append(text)
        # set here, in the caller's context: a value set in the worker thread is not seen
        return _answered(plan, completion)

    # --- internals -------------------------------------------------------------------------
    def _plan(self, prompt: str, *, streaming: bool) -> _Plan:
        """What to do with ``prompt``, first match wins: a chat engine's condense prompt is
        answered by the rule; a call inside a stock synthesis decodes over its nodes; a
        stock context block over that context; anything else over the retriever's nodes,
        or over none."""
        condense = parse_condense_prompt(prompt)
        if condense is not None:
            standalone = condense_question(condense.history, condense.message)
            span_bridge.remember_standalone(condense.message, standalone)
            return _Plan(prompt=prompt, query=standalone, nodes=[], standalone=standalone)
        synthesis = span_bridge.current_synthesis(streaming=streaming)
        if synthesis is not None:
            question = span_bridge.standalone(synthesis.question)
            return _Plan(prompt=question, query=question, nodes=list(synthesis.nodes),
                         synthesis=synthesis)
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

    def _complete_over(self, plan: _Plan, nodes: Sequence[NodeWithScore],
                       ) -> CompletionResponse:
        completion, pieces = self._start(plan, nodes, streaming=False)
        completion.text.append("".join(pieces))
        return _answered(plan, completion)

    def _start(self, plan: _Plan, nodes: Sequence[NodeWithScore], *, streaming: bool,
               ) -> tuple[span_bridge.Completion, Iterator[str]]:
        """The completion record (remembered now when streaming) and its lazy pieces."""
        passages, kept = nodes_to_passages(nodes)
        if not passages and not nodes and not self._warned:
            self._warned = True
            logger.warning(NO_PASSAGES)
        completion = span_bridge.Completion(metadata=response_metadata(kept),
                                            streaming=streaming)
        if streaming:
            span_bridge.remember(completion)
        pieces = decode_pieces(self._decoder.get(), plan.prompt, passages, kept,
                               completion.metadata, max_new_tokens=self.max_new_tokens,
                               stop=self.stop, citation_markers=numbered_sources(kept),
                               hold=not streaming)
        return completion, pieces


def numbered_sources(nodes: Sequence[NodeWithScore]) -> bool:
    """Whether ``nodes`` are ``CitationQueryEngine``'s: node n's text starts "Source n:"
    (then the answer carries ``[n]`` markers, as that engine's prompt asks)."""
    return bool(nodes) and all(
        (m := _SOURCE_LABEL.match(node_text(s))) is not None and m.group(1) == str(n)
        for n, s in enumerate(nodes, start=1))


def _answered(plan: _Plan, completion: span_bridge.Completion) -> CompletionResponse:
    """Remember a finished non-streaming completion for the engine's ``Response`` (and for
    the later calls of its synthesis); return it."""
    span_bridge.remember(completion)
    if plan.synthesis is not None:
        plan.synthesis.answer = completion
    return CompletionResponse(text="".join(completion.text),
                              additional_kwargs=completion.metadata)


def _again(plan: _Plan) -> CompletionResponse | None:
    """The answer this call's synthesis already has (a refine or summary call after the
    first), remembered again for the engine's ``Response``; ``None`` when there is none."""
    if plan.synthesis is None or plan.synthesis.answer is None:
        return None
    answer = plan.synthesis.answer
    span_bridge.remember(answer)
    return CompletionResponse(text="".join(answer.text), additional_kwargs=answer.metadata)


def _one_piece(text: str, metadata: dict[str, Any]) -> CompletionResponseGen:
    yield CompletionResponse(text=text, delta=text, additional_kwargs=metadata)
