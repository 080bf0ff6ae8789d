"""The standard langchain-tests integration suite on the real SmolLM2, with retrieval on.

Passages come from a real ``InMemoryVectorStore`` over the bundled MiniLM embeddings, so
every standard call goes through retrieval, the span datastore and citations. Tool calling
and structured output are declared unsupported (a 135M model cannot do them reliably).
"""

from __future__ import annotations

import functools

import pytest
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import ChatModelIntegrationTests

from nest_integrations.langchain import ChatNest, NestMiniLMEmbeddings

pytestmark = pytest.mark.integration

PASSAGES = [
    "Hello! I am a helpful assistant. How can I help you today?",
    "Haiku are short poems of three lines with five, seven and five syllables.",
    "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in Ostrava.",
]


@functools.cache
def _store() -> InMemoryVectorStore:
    """Built once (chat_model_params is read for every test)."""
    docs = [Document(id=f"p{i}", page_content=t, metadata={"source": f"mem://{i}"})
            for i, t in enumerate(PASSAGES)]
    return InMemoryVectorStore.from_documents(docs, NestMiniLMEmbeddings())


class TestChatNestIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatNest]:
        return ChatNest

    @property
    def chat_model_params(self) -> dict:
        return {"vectorstore": _store(), "k": 2, "max_tokens": 8}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        # `model=` per call works, but no second model is installed offline to test it on.
        return False
