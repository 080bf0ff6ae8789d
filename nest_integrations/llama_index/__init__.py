"""LlamaIndex integration: ``NestQueryEngine`` (span-cited ``Response`` objects over any
retriever, index or vector store), ``NestChatEngine`` (condense-question chat with span
citations), ``NestLLM`` (Nest behind ``Settings.llm`` in stock engines, spans in the
``Response``) and ``NestQueryEngineTool`` (a ``QueryEngineTool`` whose output lists its
sources, for agents).

Install: ``pip install "nest-decoding[llamaindex]"``.
"""

from nest_integrations.llama_index._deps import require

require("llama_index.core")

from nest_integrations.llama_index.chat_engine import NestChatEngine  # noqa: E402
from nest_integrations.llama_index.embeddings import (  # noqa: E402
    bundled_embedding,
    bundled_minilm_path,
)
from nest_integrations.llama_index.llm import NestLLM  # noqa: E402
from nest_integrations.llama_index.nodes import nodes_to_passages  # noqa: E402
from nest_integrations.llama_index.query_engine import (  # noqa: E402
    NestQueryEngine,
    NestRetrievalError,
)
from nest_integrations.llama_index.tools import NestQueryEngineTool  # noqa: E402

__all__ = [
    "NestChatEngine",
    "NestLLM",
    "NestQueryEngine",
    "NestQueryEngineTool",
    "NestRetrievalError",
    "bundled_embedding",
    "bundled_minilm_path",
    "nodes_to_passages",
]
