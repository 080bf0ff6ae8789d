"""``ChatNest``: a LangChain chat model whose answers cite the passages they copy.

The answer is one standard text block; each citation is a standard ``Citation``
(``answer[start_index:end_index] == cited_text == source page_content[src_start:src_end]``)
with ``extras["kind"]``: ``"copied"`` for text Nest copied, ``"matched"`` for text the LM
wrote itself that the document holds verbatim. The citations are the answer's
:meth:`~nest_core.types.NestResult.cited_spans` (content-carrying, whole words, merged, none
on an unsupported answer); ``response_metadata["nest"]`` lists the raw provenance apart, as
``spans`` and ``matches``.

Streaming sends text pieces as the decoder accepts them; the citations, the usage and the
metadata come in the last chunk (``chunk_position="last"``). A streamed piece's provenance is
no citation yet: whether a stretch is one depends on the text after it, on the pieces it
merges with and on whether the whole answer is supported, and annotation lists only add up
when chunks are summed (one sent early cannot be taken back). All chunks use block
``index`` 0, so ``sum(chunks)`` is the single block ``invoke`` returns (``invoke`` is built
from the stream).

Passages come from wherever the app put them (:mod:`~nest_integrations.langchain.context`):
per-call ``documents``, document content blocks in any message (standard ``text-plain`` and
``file`` blocks, Anthropic ``document`` blocks; :func:`~nest_integrations.langchain.documents.
documents_to_blocks` makes them), the retriever or vector store searched with the last
human turn's question, or context a prompt template pasted into a system or human message.
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

from nest_core.async_iter import aiter_in_thread
from nest_core.types import NestChunk, NestResult
from nest_integrations.langchain._shared import (
    PROVIDER,
    CallOptions,
    NestParams,
    nest_metadata,
    usage,
)
from nest_integrations.langchain.context import find_in_prompt
from nest_integrations.langchain.documents import blocks_to_documents, result_citations
from nest_integrations.langchain.tools import create_nest_tool

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

    Passages come, by precedence, from ``documents=[...]`` per call, from document blocks in
    the messages, from ``retriever`` / ``vectorstore``, searched with the question of the last
    human turn (not the whole prompt), or from context a prompt template pasted into a system
    or human message (``create_stuff_documents_chain``, a ``@dynamic_prompt`` agent): cited
    then without file names, with a warning. Without passages it is a plain greedy chat model
    and warns once, naming the fix. Greedy only: ``temperature`` must be None or 0. It cannot
    call tools or produce structured output (a 135M model cannot do them reliably): as the
    model of ``create_agent``, give it no tools (a ``@dynamic_prompt`` RAG agent needs none);
    for tool-calling agents, use :meth:`as_tool`, a tool that returns a cited answer.
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
        found = find_in_prompt(messages_to_prompt(messages))
        passages, sources = self._prepare(found, opts, message_documents(messages))
        prompt = self._answer_prompt(found, passages)
        for piece in self._decoder_stream(prompt, passages, opts, found.question or None):
            yield from piece_chunks(piece, sources, opts)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        opts = self._call_options(stop, kwargs)
        found = find_in_prompt(messages_to_prompt(messages))
        passages, sources = await self._aprepare(found, opts, message_documents(messages))
        prompt = self._answer_prompt(found, passages)
        pieces = aiter_in_thread(
            lambda: self._decoder_stream(prompt, passages, opts, found.question or None))
        async for piece in pieces:
            for chunk in piece_chunks(piece, sources, opts):
                yield chunk

    # --- what a 135M grounded decoder does not do: say what to use instead ------------------
    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None,
                   **kwargs: Any) -> Any:
        msg = ("ChatNest cannot call tools: it decodes one grounded answer with citations. "
               "Give an agent cited answers the other way round: make Nest a tool of a "
               "tool-calling model with chat.as_tool() or create_nest_tool(chat, retriever)")
        raise NotImplementedError(msg)

    def with_structured_output(self, schema: Any, **kwargs: Any) -> Any:
        msg = ("ChatNest does not produce structured output: its text is decoded (and cited) "
               "token by token from the documents. Parse the answer text instead (e.g. "
               "chat | StrOutputParser()), or use a tool-calling model for structure and "
               "chat.as_tool() for the grounded facts")
        raise NotImplementedError(msg)

    def as_tool(self, args_schema: Any = None, *, name: str | None = None,
                description: str | None = None, arg_types: Any = None) -> Any:
        """A tool for agents that answers a question from this model's retriever or vector
        store: the cited answer as content, the citations and source documents as artifact
        (see :func:`~nest_integrations.langchain.tools.create_nest_tool`)."""
        if args_schema is not None or arg_types is not None:
            msg = ("ChatNest.as_tool takes one string, the question: pass only name= and "
                   "description= (or use create_nest_tool)")
            raise ValueError(msg)
        return create_nest_tool(self, name=name, description=description)


def piece_chunks(piece: NestChunk, sources: list[Document],
                 opts: CallOptions) -> Iterator[ChatGenerationChunk]:
    """The chunks of one decoder piece: its text, then (on the last piece) the citations of
    the whole answer with the usage and metadata (see the module docstring for why the
    citations wait for the end)."""
    if piece.text:
        yield _text_chunk(piece.text)
    if piece.result is not None:
        yield _last_chunk(piece.result, sources, opts, result_citations(piece.result))


def _text_block(text: str, annotations: list[Citation] | None = None) -> TextContentBlock:
    block = create_text_block(text, index=BLOCK_INDEX,
                              annotations=None if annotations is None else [*annotations])
    # create_text_block invents a random id; chunks merge by index, and a random id would
    # make a streamed answer differ from the invoked one. The id is optional: drop it.
    block.pop("id", None)
    return block


# The ignores below: langchain-core types message content as ``list[str | dict]``, and mypy
# does not count its own standard blocks (TypedDicts, plain dicts at runtime) as ``dict``.
def _text_chunk(text: str, annotations: list[Citation] | None = None) -> ChatGenerationChunk:
    block = _text_block(text, annotations or None)
    return ChatGenerationChunk(message=AIMessageChunk(content=[block]))  # type: ignore[list-item]


def _last_chunk(result: NestResult, sources: list[Document], opts: CallOptions,
                annotations: list[Citation]) -> ChatGenerationChunk:
    """The citations still due, usage and metadata: sent once, at the end, so merging
    cannot mangle them."""
    message = AIMessageChunk(
        content=[_text_block("", annotations or None)],  # type: ignore[list-item]
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


def message_documents(messages: Sequence[BaseMessage]) -> list[Document]:
    """Documents given as content blocks in any message, in order."""
    docs: list[Document] = []
    for m in messages:
        if isinstance(m.content, list):
            docs.extend(blocks_to_documents(m.content))
    return docs


def retrieval_query(messages: Sequence[BaseMessage]) -> str:
    """What a retriever is asked: the question of the last human turn (its labelled question
    line, or the short paragraph beside context pasted into it), not the whole prompt."""
    return find_in_prompt(messages_to_prompt(messages)).question
