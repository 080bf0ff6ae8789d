"""LangChain integration: ``ChatNest``, ``NestLLM``, ``create_nest_chain`` and adapters.

Needs ``langchain-core`` (``pip install "nest-decoding[langchain]"``). Importing this package
loads no model and imports neither torch nor ``langchain_community``: stores are used through
the ``VectorStore``/``BaseRetriever`` interfaces the user's objects already implement.
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    msg = ('the LangChain integration needs langchain-core; run '
           '`pip install "nest-decoding[langchain]"`')
    raise ImportError(msg) from err

from nest_integrations.langchain.chains import create_nest_chain
from nest_integrations.langchain.chat_models import ChatNest
from nest_integrations.langchain.documents import (
    document_to_passage,
    documents_to_blocks,
    documents_to_passages,
    format_citations,
    passage_to_document,
    span_to_citation,
    stable_document_id,
)
from nest_integrations.langchain.embeddings import NestMiniLMEmbeddings
from nest_integrations.langchain.llms import NestLLM
from nest_integrations.langchain.tools import NestToolInput, create_nest_tool

__all__ = [
    "ChatNest",
    "NestLLM",
    "NestMiniLMEmbeddings",
    "NestToolInput",
    "create_nest_chain",
    "create_nest_tool",
    "document_to_passage",
    "documents_to_blocks",
    "documents_to_passages",
    "format_citations",
    "passage_to_document",
    "span_to_citation",
    "stable_document_id",
]
