"""``ChatNest``: a LangChain chat model whose answers cite the passages they copy.

The answer is one standard text block; each cited span is a standard ``Citation``
(``answer[start_index:end_index] == cited_text == source page_content[src_start:src_end]``)
with ``extras["kind"]``: ``"copied"`` for text Nest copied, ``"matched"`` for text the LM
wrote itself that the document holds verbatim. ``response_metadata["nest"]`` lists them
apart, as ``spans`` and ``matches``.
Streaming sends text pieces as the decoder accepts them; a copied span's citation rides
with the first chunk after the span is complete (the chunk that starts the next run), and
the matched spans, the usage and the metadata come in the last chunk
(``chunk_position="last"``). All chunks use block ``index`` 0 and ``AIMessageChunk.__add__``
concatenates annotation lists, so ``sum(chunks)`` is the single block ``invoke`` returns
(``invoke`` is built from the stream). Scalars other than a citation's own are never sent
early: merging adds ints.

Documents can come in the messages themselves, as standard ``text-plain`` content blocks
(:func:`~nest_integrations.langchain.documents.documents_to_blocks`, or
``create_plaintext_block``), the way citation-capable chat models receive them.
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
from nest_core.prompts import question_of
from nest_core.types import NestChunk, NestResult, Span
from nest_integrations.langchain._shared import (
    PROVIDER,
    CallOptions,
    NestParams,
    nest_metadata,
    usage,
)
from nest_integrations.langchain.documents import (
    blocks_to_documents,
    result_citations,
    span_to_citation,
)
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

    Passages come, by precedence, from ``documents=[...]`` per call, from ``text-plain``
    document blocks in the messages, or from ``retriever`` / ``vectorstore``, searched with
    the user's question: the last human message, or the question line inside it when a prompt
    template has stuffed retrieved context around it. Without passages it is a plain greedy
    chat model. Greedy only: ``temperature`` must be None or 0. It cannot call tools or
    produce structured output (a 135M model cannot do them reliably); for agents, use
    :meth:`as_tool`, a tool that returns a cited answer.
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
        given, asked = message_documents(messages), retrieval_query(messages)
        question = self._query(asked, opts, given)
        passages, sources = self._retrieve(question or asked, opts, given)
        prompt = self._answer_prompt(messages_to_prompt(messages), question, passages)
        citing = CitationStream()
        for piece in self._decoder_stream(prompt, passages, opts, question):
            yield from citing.chunks(piece, sources, opts)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        opts = self._call_options(stop, kwargs)
        given, asked = message_documents(messages), retrieval_query(messages)
        question = self._query(asked, opts, given)
        passages, sources = await self._aretrieve(question or asked, opts, given)
        prompt = self._answer_prompt(messages_to_prompt(messages), question, passages)
        citing = CitationStream()
        pieces = aiter_in_thread(
            lambda: self._decoder_stream(prompt, passages, opts, question))
        async for piece in pieces:
            for chunk in citing.chunks(piece, sources, opts):
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


class CitationStream:
    """Turns decoder pieces into chunks, citing each copied span as soon as it is complete.

    Consecutive pieces copied from consecutive rows of one passage make one span (as in the
    result); the span is cited in the chunk of the first piece that does not continue it.
    The last chunk cites what is left: the span still open, any copied span of the result
    not cited yet, and the matched spans (found only once the answer is complete).
    """

    def __init__(self) -> None:
        self.text = ""
        self.open: Span | None = None
        self.sent: set[str] = set()

    def chunks(self, piece: NestChunk, sources: list[Document],
               opts: CallOptions) -> Iterator[ChatGenerationChunk]:
        self.text += piece.text
        closed = self._feed(piece.span, bool(piece.text.strip()))
        if piece.text or closed:
            yield _text_chunk(piece.text, self._cite(closed))
        if piece.result is not None:
            yield _last_chunk(piece.result, sources, opts, self._rest(piece.result))

    def _feed(self, span: Span | None, has_text: bool) -> list[Span]:
        """The span closed by this piece, if any (whitespace-only pieces close nothing)."""
        if span is None and not has_text:
            return []
        if span is not None and self.open is not None and _continues(self.open, span):
            self.open = _joined(self.open, span, self.text)
            return []
        closed = [self.open] if self.open is not None else []
        self.open = span
        return closed

    def _cite(self, spans: list[Span]) -> list[Citation]:
        citations = [span_to_citation(s) for s in spans]
        self.sent.update(str(c.get("id")) for c in citations)
        return citations

    def _rest(self, result: NestResult) -> list[Citation]:
        rest = self._cite([self.open] if self.open is not None else [])
        self.open = None
        return rest + [c for c in result_citations(result) if str(c.get("id")) not in self.sent]


def _continues(first: Span, then: Span) -> bool:
    """Whether ``then`` copies on from where ``first`` left off in the same passage."""
    return (then.passage.id == first.passage.id and then.kind == first.kind == "copied"
            and then.source_row - first.source_row == then.token_start - first.token_start)


def _joined(first: Span, then: Span, output: str) -> Span:
    return Span(text=output[first.out_start:then.out_end], out_start=first.out_start,
                out_end=then.out_end, passage=first.passage, src_start=first.src_start,
                src_end=then.src_end, token_start=first.token_start,
                token_end=then.token_end, source_row=first.source_row)


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
    """Documents given as ``text-plain`` content blocks in any message, in order."""
    docs: list[Document] = []
    for m in messages:
        if isinstance(m.content, list):
            docs.extend(blocks_to_documents(m.content))
    return docs


def retrieval_query(messages: Sequence[BaseMessage]) -> str:
    """What the user asked (:func:`~nest_core.prompts.question_of`: the last user message
    with text); the last message's text if there is none."""
    return question_of(messages_to_prompt(messages)) or (messages[-1].text if messages else "")
