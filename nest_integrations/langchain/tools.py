"""``create_nest_tool``: Nest as a tool for LangChain and LangGraph agents.

The agent's own (tool-calling) model decides when to look something up; the tool answers the
question from the documents with Nest and returns the cited answer as the ``ToolMessage``
content (the text with ``[n]`` marks and one line per source, what the agent model reads)
and the structured citations as its ``artifact`` (what the application reads: exact
character ranges, document ids, the source documents). A 135M model cannot drive an agent
itself; as a tool it gives any agent answers whose every copied word is traceable.
"""

from __future__ import annotations

from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.vectorstores import VectorStore
from pydantic import BaseModel, Field

from nest_integrations.langchain._shared import NestParams
from nest_integrations.langchain.documents import format_citations

DEFAULT_NAME = "answer_from_documents"
DEFAULT_DESCRIPTION = (
    "Answer a question from the document collection. Returns the answer with numbered "
    "citations of the passages it copied from. Ask one standalone question.")


class NestToolInput(BaseModel):
    """The tool's typed input: one standalone question."""

    query: str = Field(description="A standalone question to answer from the documents "
                                   "(resolve pronouns from the conversation first).")


def create_nest_tool(chat: Any, retriever: BaseRetriever | VectorStore | None = None, *,
                     name: str | None = None, description: str | None = None) -> BaseTool:
    """A ``StructuredTool`` (``response_format="content_and_artifact"``) over ``chat``.

    ``chat`` is a :class:`~nest_integrations.langchain.ChatNest`; ``retriever`` (or a vector
    store) supplies the passages, else the chat model's own ``retriever``/``vectorstore``.
    The artifact is a dict: ``answer`` (text), ``citations`` (standard ``Citation`` dicts,
    copied and matched), ``source_documents`` (``Document``) and ``nest`` (spans and stats).
    """
    if not (isinstance(chat, NestParams) and isinstance(chat, BaseChatModel)):  # a ChatNest
        msg = f"create_nest_tool needs a ChatNest, got {type(chat).__name__}"
        raise TypeError(msg)
    if isinstance(retriever, VectorStore):
        retriever = retriever.as_retriever(search_kwargs={"k": chat.k})
    if retriever is not None and not isinstance(retriever, BaseRetriever):
        msg = f"retriever must be a BaseRetriever or VectorStore, got {type(retriever).__name__}"
        raise TypeError(msg)
    if retriever is None and chat.retriever is None and chat.vectorstore is None:
        msg = ("the Nest tool has nothing to answer from: pass retriever=... (or a vector "
               "store), or build ChatNest(retriever=...) / ChatNest(vectorstore=...)")
        raise ValueError(msg)

    def _messages(query: str) -> list[BaseMessage]:
        if not isinstance(query, str) or not query.strip():
            msg = "the tool needs a non-empty question in `query`"
            raise ValueError(msg)
        return [HumanMessage(query)]

    def answer(query: str) -> tuple[str, dict[str, Any]]:
        docs = retriever.invoke(query) if retriever is not None else None
        message = chat.invoke(_messages(query), **_docs_option(docs))
        return _content_and_artifact(message)

    async def aanswer(query: str) -> tuple[str, dict[str, Any]]:
        docs = await retriever.ainvoke(query) if retriever is not None else None
        message = await chat.ainvoke(_messages(query), **_docs_option(docs))
        return _content_and_artifact(message)

    return StructuredTool.from_function(
        func=answer, coroutine=aanswer, name=name or DEFAULT_NAME,
        description=description or DEFAULT_DESCRIPTION, args_schema=NestToolInput,
        response_format="content_and_artifact")


def _docs_option(docs: list[Document] | None) -> dict[str, Any]:
    return {} if docs is None else {"documents": docs}


def _content_and_artifact(message: Any) -> tuple[str, dict[str, Any]]:
    block = message.content[0] if message.content else {"text": "", "annotations": []}
    citations = list(block.get("annotations") or [])
    text = str(block.get("text", ""))
    artifact = {
        "answer": text,
        "citations": citations,
        "source_documents": message.response_metadata.get("source_documents", []),
        "nest": message.response_metadata.get("nest", {}),
    }
    return format_citations(text, citations), artifact
