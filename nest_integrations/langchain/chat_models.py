"""``ChatNest``: a LangChain chat model whose answers cite the passages they copy.

The answer is one standard text block; each cited span is a standard ``Citation``
(``answer[start_index:end_index] == cited_text == source page_content[src_start:src_end]``)
with ``extras["kind"]``: ``"copied"`` for text Nest copied, ``"matched"`` for text the LM
wrote itself that the document holds verbatim. ``response_metadata["nest"]`` lists them
apart, as ``spans`` and ``matches``.
Streaming sends plain text pieces as the decoder accepts them and puts every annotation, the
usage and the metadata in the last chunk (``chunk_position="last"``). All chunks use block
``index`` 0, so ``sum(chunks)`` merges into the same single block ``invoke`` returns:
``AIMessageChunk.__add__`` concatenates strings and adds ints, so per-piece scalars would be
mangled and are never sent early.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import (
    BaseChatModel,
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.content import Citation, TextContentBlock, create_text_block
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from nest_core.types import NestResult
from nest_integrations.langchain._shared import (
    PROVIDER,
    CallOptions,
    NestParams,
    aiter_in_thread,
    nest_metadata,
    usage,
)
from nest_integrations.langchain.documents import result_citations

BLOCK_INDEX = 0  # the answer is always one text block


class ChatNest(NestParams, BaseChatModel):
    """Chat with Nearest Neighbor Speculative Decoding over your retriever or vector store.

    Example:
        ```python
        from langchain_chroma import Chroma
        from nest_integrations.langchain import ChatNest, NestMiniLMEmbeddings

        store = Chroma(persist_directory="db", embedding_function=NestMiniLMEmbeddings())
        chat = ChatNest(vectorstore=store, k=4, max_tokens=64)
        msg = chat.invoke("What is FOLDOC?")
        msg.text, msg.content[0]["annotations"], msg.response_metadata["source_documents"]
        ```

    Passages come from ``retriever``, ``vectorstore`` or, per call, ``documents=[...]``
    (which wins); the retrieval query is the last human message. Without passages it is a
    plain greedy chat model. Greedy only: ``temperature`` must be None or 0. Tool calling
    and structured output are not supported (a 135M model cannot do them reliably).
    """

    @property
    def _llm_type(self) -> str:
        return "nest-chat"


    # --- generation: invoke is built from stream so the two cannot drift --------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        return await agenerate_from_stream(
            self._astream(messages, stop, run_manager, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        opts = self._call_options(stop, kwargs)
        prompt = messages_to_prompt(messages)
        passages, sources = self._retrieve(retrieval_query(messages), opts)
        for piece in self._decoder_stream(prompt, passages, opts):
            if piece.text:
                yield _text_chunk(piece.text)
            if piece.result is not None:
                yield _last_chunk(piece.result, sources, opts)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        opts = self._call_options(stop, kwargs)
        prompt = messages_to_prompt(messages)
        passages, sources = await self._aretrieve(retrieval_query(messages), opts)
        pieces = aiter_in_thread(lambda: self._decoder_stream(prompt, passages, opts))
        async for piece in pieces:
            if piece.text:
                yield _text_chunk(piece.text)
            if piece.result is not None:
                yield _last_chunk(piece.result, sources, opts)


def _text_block(text: str, annotations: list[Citation] | None = None) -> TextContentBlock:
    block = create_text_block(text, annotations=annotations, index=BLOCK_INDEX)
    # create_text_block invents a random id; chunks merge by index, and a random id would
    # make a streamed answer differ from the invoked one. The id is optional: drop it.
    block.pop("id", None)
    return block


def _text_chunk(text: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=[_text_block(text)]))


def _last_chunk(result: NestResult, sources: list[Document],
                opts: CallOptions) -> ChatGenerationChunk:
    """Annotations, usage and metadata: sent once, at the end, so merging cannot mangle them."""
    message = AIMessageChunk(
        content=[_text_block("", result_citations(result))],
        usage_metadata=usage(result),
        response_metadata={
            "model_name": opts.model_name,
            "model_provider": PROVIDER,
            "finish_reason": result.finish_reason,
            "source_documents": sources,
            "nest": nest_metadata(result),
        },
        chunk_position="last",
    )
    return ChatGenerationChunk(message=message)


_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def messages_to_prompt(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``{"role", "content"}`` dicts for the model's chat template."""
    prompt = []
    for m in messages:
        if isinstance(m, ChatMessage):
            role = m.role
        elif isinstance(m, (HumanMessage, AIMessage, SystemMessage, ToolMessage)):
            role = _ROLES[m.type]
        else:
            msg = f"unsupported message type {type(m).__name__}; use Human/AI/System messages"
            raise TypeError(msg)
        prompt.append({"role": role, "content": m.text})
    return prompt


def retrieval_query(messages: Sequence[BaseMessage]) -> str:
    """The last human message (what the user asked); the last message if there is none."""
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return m.text
    return messages[-1].text if messages else ""
