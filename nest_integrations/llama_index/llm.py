"""``NestLLM``: Nest decoding behind LlamaIndex's ``LLM`` interface, for ``Settings.llm``.

What it is, and is not: an LLM only sees a prompt, but Nest needs passages to copy from.
So ``NestLLM`` is given a retriever and retrieves its own passages for every prompt (the
question is taken from the stock QA templates' ``Query: ...`` line when present, else the
whole prompt is the retrieval query). Stock engines keep only the completion *text*, so the
spans reach you only through :meth:`complete`'s ``additional_kwargs["nest_spans"]`` (copied)
and ``additional_kwargs["nest_matches"]`` (matched; offsets into the completion text). For
``Response`` objects with ``source_nodes`` and span citations, use
:class:`~nest_integrations.llama_index.NestQueryEngine`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
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

from nest_core.config import NestConfig
from nest_integrations.llama_index._runtime import LazyDecoder, decode_pieces
from nest_integrations.llama_index.nodes import nodes_to_passages, response_metadata

logger = logging.getLogger(__name__)

# The stock text-QA and refine templates end with "Query: {query_str}\nAnswer: ".
_QUERY_LINE = re.compile(r"Query:\s*(?P<query>.+?)\s*\n\s*Answer:\s*$", re.DOTALL)


def retrieval_query(prompt: str) -> str:
    """The question inside a stock QA prompt, else the prompt itself."""
    match = _QUERY_LINE.search(prompt)
    query = match.group("query") if match else prompt
    return query.rsplit("Query:", 1)[-1].strip() or prompt


class NestLLM(CustomLLM):
    """A text-completion LLM that decodes with Nest over passages from ``retriever``.

    Text only: spans and sources cannot travel through stock engines (they drop LLM
    metadata). Calling :meth:`complete` directly gives them in ``additional_kwargs``.
    """

    retriever: BaseRetriever = Field(description="Retriever queried for every prompt.")
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
        """``lm``/``key_cache`` are injected as is; nothing is loaded here."""
        super().__init__(**data)
        self._decoder = LazyDecoder(model_name=self.model_name, dtype=self.dtype,
                                    config=self.config, lm=lm, key_cache=key_cache,
                                    datastore_dir=self.datastore_dir)

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
        text, meta = "", None
        for text, meta in self._run(prompt):  # noqa: B007
            pass
        return CompletionResponse(text=text, additional_kwargs=meta or {})

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any,
                        ) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            text = ""
            for text_now, meta in self._run(prompt):
                delta, text = text_now[len(text):], text_now
                yield CompletionResponse(text=text, delta=delta, additional_kwargs=meta)
        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any,
                        ) -> CompletionResponse:
        """Retrieval (``aretrieve``) on the loop; decoding in a worker thread."""
        nodes = await self.retriever.aretrieve(retrieval_query(prompt))
        return await asyncio.to_thread(self._complete_over, prompt, nodes)

    # --- internals -------------------------------------------------------------------------
    def _run(self, prompt: str) -> Any:
        nodes = self.retriever.retrieve(retrieval_query(prompt))
        yield from self._decode(prompt, nodes)

    def _complete_over(self, prompt: str, nodes: Sequence[Any]) -> CompletionResponse:
        text, meta = "", None
        for text, meta in self._decode(prompt, nodes):  # noqa: B007
            pass
        return CompletionResponse(text=text, additional_kwargs=meta or {})

    def _decode(self, prompt: str, nodes: Sequence[Any]) -> Any:
        """Yield ``(text so far, metadata)`` while decoding."""
        passages, kept = nodes_to_passages(nodes)
        if not passages:
            logger.warning("NestLLM: the retriever gave no text nodes; decoding without "
                           "passages (plain LM, no attribution)")
        meta = response_metadata(kept)
        text = ""
        for piece in decode_pieces(self._decoder.get(), prompt, passages, kept, meta,
                                   max_new_tokens=self.max_new_tokens, stop=self.stop,
                                   citation_markers=False):
            text += piece
            yield text, meta
        yield text, meta
