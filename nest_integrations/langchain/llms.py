"""``NestLLM``: the string-in, string-out LangChain surface of Nest.

A ``BaseLLM`` (not ``LLM``, whose ``_call`` returns a bare string with nowhere to put
citations). Each ``Generation.generation_info`` holds ``spans`` (copied, with output and
source offsets), ``matches`` (matched: text the LM wrote that a document holds verbatim;
same fields, ``kind="matched"``), ``source_documents`` and ``stats``; the streamed
``GenerationChunk``s carry only text until the last one, so adding them up gives exactly the
invoked generation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from nest_core.async_iter import aiter_in_thread
from nest_core.types import NestChunk, NestResult
from nest_integrations.langchain._shared import (
    CallOptions,
    NestParams,
    default_model_name,
    nest_metadata,
    usage,
)
from nest_integrations.langchain.context import find_in_text


class NestLLM(NestParams, BaseLLM):
    """Nest as a LangChain LLM: a prompt string in, an attributed completion out.

    The prompt goes through the model's chat template as one user message (SmolLM2 is an
    instruct model). Its question (a labelled question line, or the short paragraph beside
    context a template pasted into it; else the whole prompt) is the retrieval query; without
    a retriever, pasted context is the passages (see :class:`ChatNest`, same fields).
    ``generation_info["citations"]`` are the answer's citations (``cited_spans``).
    """

    @property
    def _llm_type(self) -> str:
        return "nest"

    _ls_model_type: ClassVar[str] = "llm"

    # --- generation: _generate is built from _stream so the two cannot drift ----------------
    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> LLMResult:
        generations = []
        for prompt in prompts:
            chunks = list(self._stream(prompt, stop, run_manager, **kwargs))
            generations.append([_merge(chunks)])
        return LLMResult(generations=generations, llm_output=self._llm_output(kwargs))

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> LLMResult:
        generations = []
        for prompt in prompts:
            chunks = [c async for c in self._astream(prompt, stop, run_manager, **kwargs)]
            generations.append([_merge(chunks)])
        return LLMResult(generations=generations, llm_output=self._llm_output(kwargs))

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        opts = self._call_options(stop, kwargs)
        found = find_in_text(prompt)
        passages, sources = self._prepare(found, opts)
        answer_prompt = self._answer_prompt(found, passages)[-1]["content"]  # one user turn
        for piece in self._decoder_stream(answer_prompt, passages, opts, found.question or None):
            for chunk in _piece_chunks(piece, sources, opts):
                # BaseLLM.stream does not report tokens itself: callbacks rely on this call.
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        opts = self._call_options(stop, kwargs)
        found = find_in_text(prompt)
        passages, sources = await self._aprepare(found, opts)
        answer_prompt = self._answer_prompt(found, passages)[-1]["content"]  # one user turn
        pieces = aiter_in_thread(
            lambda: self._decoder_stream(answer_prompt, passages, opts, found.question or None))
        async for piece in pieces:
            for chunk in _piece_chunks(piece, sources, opts):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _llm_output(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"model_name": kwargs.get("model") or self.model or default_model_name()}


def _piece_chunks(piece: NestChunk, sources: list[Document],
                  opts: CallOptions) -> list[GenerationChunk]:
    """The text of a decoder piece, then (on the last piece) the metadata-only chunk."""
    chunks = [GenerationChunk(text=piece.text)] if piece.text else []
    if piece.result is not None:
        chunks.append(_last_chunk(piece.result, sources, opts))
    return chunks


def _last_chunk(result: NestResult, sources: list[Document],
                opts: CallOptions) -> GenerationChunk:
    info = {"source_documents": sources, "finish_reason": result.finish_reason,
            "model_name": opts.model_name, "usage": usage(result), **nest_metadata(result)}
    return GenerationChunk(text="", generation_info=info)


def _merge(chunks: list[GenerationChunk]) -> Generation:
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return Generation(text=total.text, generation_info=total.generation_info)
