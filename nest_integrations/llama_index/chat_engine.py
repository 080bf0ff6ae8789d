"""``NestChatEngine``: a condense-question chat engine whose answers cite spans.

The semantics of LlamaIndex's ``CondenseQuestionChatEngine``: the follow-up and the chat
history are condensed into one standalone question, the :class:`NestQueryEngine` answers it
(retrieval, node postprocessors, Nest decoding, events), and the turn is written to memory.
Condensing is a deterministic rule by default (:mod:`.condense`: pronouns replaced by the
conversation's subject), because a rewrite by the bundled 135M model is unreliable and a wrong
standalone question retrieves the wrong nodes; pass ``condense_question=`` to use your own.

Every answer carries what the query engine gives: ``AgentChatResponse.metadata`` holds
``nest_spans`` / ``nest_matches`` (offsets into ``response``) and the node metadata;
``source_nodes`` are the nodes decoded over; ``sources[0]`` is a ``ToolOutput`` whose
``raw_input`` is the standalone question and ``raw_output`` the query engine's response.
While streaming, ``sources[0].raw_output.metadata["nest_spans"]`` fills as the text arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from threading import Thread
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    StreamingResponse,
)
from llama_index.core.callbacks import CallbackManager, trace_method
from llama_index.core.chat_engine.types import (
    AgentChatResponse,
    BaseChatEngine,
    StreamingAgentChatResponse,
)
from llama_index.core.chat_engine.utils import (
    aresponse_gen_from_query_engine,
    response_gen_from_query_engine,
)
from llama_index.core.memory import BaseMemory, ChatMemoryBuffer
from llama_index.core.schema import QueryBundle
from llama_index.core.tools import ToolOutput

from nest_integrations.llama_index.condense import CondenseFn, condense_question
from nest_integrations.llama_index.query_engine import NestQueryEngine

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_LIMIT = 3000  # history kept for condensing; SmolLM2's window is 8192


class NestChatEngine(BaseChatEngine):
    """Condense the conversation, answer with :class:`NestQueryEngine`, remember the turn.

    Build it with :meth:`from_defaults` (``CondenseQuestionChatEngine``'s signature) or from
    an engine: ``NestChatEngine.from_defaults(NestQueryEngine.from_index(index))``.
    """

    def __init__(self, query_engine: NestQueryEngine, memory: BaseMemory, *,
                 condense_question: CondenseFn = condense_question,
                 callback_manager: CallbackManager | None = None) -> None:
        if not isinstance(query_engine, NestQueryEngine):
            msg = (f"query_engine must be a NestQueryEngine, got "
                   f"{type(query_engine).__name__}; for another engine use LlamaIndex's "
                   f"CondenseQuestionChatEngine (with Settings.llm = NestLLM())")
            raise TypeError(msg)
        self._query_engine = query_engine
        self._memory = memory
        self._condense = condense_question
        self.callback_manager = callback_manager or query_engine.callback_manager

    @classmethod
    def from_defaults(cls, query_engine: NestQueryEngine, *,
                      chat_history: Sequence[ChatMessage] | None = None,
                      memory: BaseMemory | None = None,
                      condense_question: CondenseFn = condense_question,
                      token_limit: int = DEFAULT_TOKEN_LIMIT, **kwargs: Any,
                      ) -> NestChatEngine:
        """``chat_history`` seeds a new ``ChatMemoryBuffer`` unless ``memory`` is given.
        ``llm`` and ``condense_question_prompt`` are refused: condensing is
        ``condense_question`` (a function of the history and the message)."""
        for name in ("llm", "condense_question_prompt", "system_prompt", "prefix_messages"):
            if kwargs.get(name) is not None:
                msg = (f"NestChatEngine does not support {name}=: pass condense_question="
                       f"a function (history, message) -> standalone question, and set "
                       f"system_prompt on the NestQueryEngine")
                raise ValueError(msg)
        memory = memory or ChatMemoryBuffer.from_defaults(
            chat_history=list(chat_history or []), token_limit=token_limit)
        return cls(query_engine, memory, condense_question=condense_question,
                   callback_manager=kwargs.get("callback_manager"))

    @property
    def chat_history(self) -> list[ChatMessage]:
        return self._memory.get_all()

    def reset(self) -> None:
        self._memory.reset()

    def standalone_question(self, message: str,
                            chat_history: Sequence[ChatMessage] | None = None) -> str:
        """The question the query engine will be asked for ``message``."""
        history = list(chat_history) if chat_history is not None else self._memory.get_all()
        question = self._condense(history, message)
        logger.info("Querying with: %s", question)
        return question

    # --- chat ------------------------------------------------------------------------------
    @trace_method("chat")
    def chat(self, message: str, chat_history: list[ChatMessage] | None = None,
             ) -> AgentChatResponse:
        question = self.standalone_question(message, chat_history)
        response = self._query_engine._evented_query(QueryBundle(question), streaming=False)
        return self._record(message, question, response)

    @trace_method("chat")
    async def achat(self, message: str, chat_history: list[ChatMessage] | None = None,
                    ) -> AgentChatResponse:
        question = self.standalone_question(message, chat_history)
        response = await self._query_engine._aevented_query(QueryBundle(question),
                                                            streaming=False)
        return self._record(message, question, response)

    @trace_method("chat")
    def stream_chat(self, message: str, chat_history: list[ChatMessage] | None = None,
                    ) -> StreamingAgentChatResponse:
        """Stream the answer; the assistant turn is written to memory when it ends (by a
        thread, as in ``CondenseQuestionChatEngine``)."""
        question = self.standalone_question(message, chat_history)
        response = self._query_engine._evented_query(QueryBundle(question), streaming=True)
        assert isinstance(response, StreamingResponse)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))
        chat = StreamingAgentChatResponse(
            chat_stream=response_gen_from_query_engine(response.response_gen),
            sources=[_tool_output(question, response)], source_nodes=response.source_nodes)
        thread = Thread(target=chat.write_response_to_history, args=(self._memory,))
        chat.write_response_to_history_thread = thread
        thread.start()
        return chat

    @trace_method("chat")
    async def astream_chat(self, message: str,
                           chat_history: list[ChatMessage] | None = None,
                           ) -> StreamingAgentChatResponse:
        """Async stream (decoding in a worker thread); memory written by a task at the end."""
        question = self.standalone_question(message, chat_history)
        response = await self._query_engine._aevented_query(QueryBundle(question),
                                                            streaming=True)
        assert isinstance(response, AsyncStreamingResponse)
        await self._memory.aput(ChatMessage(role=MessageRole.USER, content=message))
        chat = StreamingAgentChatResponse(
            achat_stream=aresponse_gen_from_query_engine(response.async_response_gen()),
            sources=[_tool_output(question, response)], source_nodes=response.source_nodes)
        chat.awrite_response_to_history_task = asyncio.create_task(
            chat.awrite_response_to_history(self._memory))
        return chat

    # --- internals -------------------------------------------------------------------------
    def _record(self, message: str, question: str, response: RESPONSE_TYPE,
                ) -> AgentChatResponse:
        text = str(response)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))
        self._memory.put(ChatMessage(role=MessageRole.ASSISTANT, content=text))
        return AgentChatResponse(response=text, sources=[_tool_output(question, response)],
                                 source_nodes=list(response.source_nodes),
                                 metadata=response.metadata)


def _tool_output(question: str, response: RESPONSE_TYPE) -> ToolOutput:
    streaming = isinstance(response, (StreamingResponse, AsyncStreamingResponse))
    return ToolOutput(content="" if streaming else str(response), tool_name="query_engine",
                      raw_input={"query": question}, raw_output=response)


__all__ = ["NestChatEngine"]
