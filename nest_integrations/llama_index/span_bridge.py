"""How ``NestLLM``'s spans reach ``Response.metadata`` inside stock query engines.

A stock synthesizer keeps only the LLM's *text* (``LLM.predict`` returns a ``str``) and
builds ``Response.metadata`` itself, so nothing the LLM returns besides text can get there.
What does reach every handler is LlamaIndex's instrumentation: the dispatcher emits
``RetrievalEndEvent(nodes=...)`` before the LLM is called and ``SynthesizeEndEvent(response=
...)`` with the very ``Response`` object the engine then returns. So :class:`SpanBridge`, an
instrumentation event handler on the root dispatcher, does two things:

* on ``RetrievalEndEvent`` it remembers the retrieved nodes, so ``NestLLM`` can map the
  context chunks of its prompt back to node ids (the candidates of
  :func:`~nest_integrations.llama_index.stock_prompt.context_nodes`);
* on ``SynthesizeEndEvent`` it adds the last ``NestLLM`` completion's ``nest_*`` entries to
  ``response.metadata`` and renumbers ``source_index`` against ``response.source_nodes``.
  Stock synthesizers start a streaming LLM call only when the ``StreamingResponse`` is first
  read, so such a response waits, and ``NestLLM.stream_complete`` attaches its live metadata
  dict (it fills while the generator runs) when it starts. Read a streaming response before
  starting the next streaming query in the same thread.

A second handler, :class:`SynthesisSpans`, reads LlamaIndex's instrumentation *spans* (the
call tree, with each call's bound arguments and result), for what no event carries:

* entering ``BaseSynthesizer.synthesize`` (or ``asynthesize``) it records that call's query
  and nodes as the current :class:`Synthesis`: the nodes every stock synthesizer's prompts
  show (compact, refine, tree_summarize, ``CitationQueryEngine``'s numbered "Source n"
  nodes, the chat engines' context), as node objects, whatever the prompt template;
* leaving ``BaseChatEngine.chat`` / ``achat`` it gives an ``AgentChatResponse`` that has no
  metadata (``ContextChatEngine``, ``CondensePlusContextChatEngine`` drop the synthesizer's
  ``Response.metadata``) the metadata of the response its text came from.

Both are kept in context variables: the retrieval, the LLM call and the end of synthesis of
one query run in one thread (or one asyncio task), so concurrent queries never see each
other's nodes or spans. ``SynthesizeStartEvent`` clears the pending completion, so a response
only gets spans from a ``NestLLM`` call made while it was being synthesized. The handlers
are registered once per process, when the first ``NestLLM`` is built (:func:`install`).
"""

from __future__ import annotations

import inspect
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.chat_engine.types import AgentChatResponse, BaseChatEngine
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
from llama_index.core.instrumentation.events.synthesis import (
    SynthesizeEndEvent,
    SynthesizeStartEvent,
)
from llama_index.core.instrumentation.span import BaseSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers import BaseSynthesizer
from llama_index.core.schema import NodeWithScore, QueryBundle

MAX_RECENT_NODES = 256  # candidates kept for mapping context chunks back to nodes


@dataclass
class Completion:
    """One ``NestLLM`` call: its metadata dict (filled while decoding) and its text."""

    metadata: dict[str, Any]
    streaming: bool
    text: list[str] = field(default_factory=list)  # pieces, joined when done


@dataclass
class Synthesis:
    """One stock synthesizer call: the question and the nodes it answers over.

    ``answer`` is ``NestLLM``'s completion over all of ``nodes``: the synthesizer's later LLM
    calls (refine, tree_summarize's levels) get it again instead of an answer over their one
    chunk, so the final answer is the one over every node, and it is decoded once.
    """

    question: str
    nodes: tuple[NodeWithScore, ...]
    open: bool = True  # False once synthesize returned (a streaming call may come later)
    answer: Completion | None = None


_recent_nodes: ContextVar[tuple[NodeWithScore, ...]] = ContextVar("nest_recent_nodes",
                                                                 default=())
_pending: ContextVar[Completion | None] = ContextVar("nest_pending_completion", default=None)
# a streaming response whose LLM call has not started yet (stock synthesizers call
# ``llm.stream`` lazily, when the response generator is first read)
_waiting: ContextVar[Any] = ContextVar("nest_waiting_response", default=None)
_synthesis: ContextVar[Synthesis | None] = ContextVar("nest_synthesis", default=None)
# the last response a completion was attached to (chat engines copy their text from it)
_answered: ContextVar[Any] = ContextVar("nest_answered_response", default=None)
# the last condensed chat follow-up and its standalone question
_standalone: ContextVar[tuple[str, str] | None] = ContextVar("nest_standalone", default=None)
_install_lock = threading.Lock()
_installed: list[tuple[SpanBridge, SynthesisSpans]] = []
_SYNTHESIZE = ("synthesize", "asynthesize")
_CHAT = ("chat", "achat")


def recent_nodes() -> tuple[NodeWithScore, ...]:
    """Nodes retrieved lately in this thread/task, newest first."""
    return _recent_nodes.get()


def current_synthesis(*, streaming: bool) -> Synthesis | None:
    """The synthesis an LLM call belongs to: the one open in this thread/task, or, for a
    streaming call (stock synthesizers start it lazily, when the response is read), the
    last one if it has no answer yet. ``None`` outside any stock synthesis (a chat engine's
    condense prompt, a direct ``complete``)."""
    synthesis = _synthesis.get()
    if synthesis is None or synthesis.open:
        return synthesis
    return synthesis if streaming and synthesis.answer is None else None


def remember(completion: Completion) -> None:
    """Attach ``completion`` to the streaming response waiting for it, if any; else make it
    the one the next ``SynthesizeEndEvent`` attaches."""
    waiting = _waiting.get()
    if completion.streaming and waiting is not None:
        _waiting.set(None)
        attach(waiting, completion)
        return
    _pending.set(completion)


class SpanBridge(BaseEventHandler):
    """Carries nodes to ``NestLLM`` and its spans back to the engine's ``Response``."""

    @classmethod
    def class_name(cls) -> str:
        return "NestSpanBridge"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, RetrievalEndEvent):
            fresh = tuple(event.nodes or ())
            _recent_nodes.set((fresh + _recent_nodes.get())[:MAX_RECENT_NODES])
        elif isinstance(event, SynthesizeStartEvent):
            _pending.set(None)
            _waiting.set(None)
        elif isinstance(event, SynthesizeEndEvent):
            completion = _pending.get()
            if completion is not None:
                if attach(event.response, completion):
                    _pending.set(None)
            elif isinstance(event.response, (StreamingResponse, AsyncStreamingResponse)):
                _waiting.set(event.response)


def attach(response: Any, completion: Completion) -> bool:
    """Put ``completion``'s ``nest_*`` entries into ``response.metadata``; False when the
    response is not this completion's text (then its offsets would not fit)."""
    if response is None or not hasattr(response, "source_nodes"):
        return False
    if not completion.streaming and \
            str(getattr(response, "response", "")) != "".join(completion.text):
        return False
    meta = completion.metadata
    for key, value in (getattr(response, "metadata", None) or {}).items():
        meta.setdefault(key, value)
    position = {s.node.node_id: i for i, s in enumerate(response.source_nodes, start=1)}
    for span in [*meta.get("nest_spans", []), *meta.get("nest_matches", [])]:
        span["source_index"] = position.get(span["node_id"], span["source_index"])
    response.metadata = meta
    _answered.set(response)
    return True


class SynthesisSpans(BaseSpanHandler[BaseSpan]):
    """Records each stock synthesis's question and nodes; gives chat responses their spans.

    It keeps no span objects (``new_span`` returns ``None``, as ``NullSpanHandler`` does):
    it only reads the calls' arguments and results.
    """

    @classmethod
    def class_name(cls) -> str:
        return "NestSynthesisSpans"

    def new_span(self, id_: str, bound_args: inspect.BoundArguments,
                 instance: Any | None = None, parent_span_id: str | None = None,
                 tags: dict[str, Any] | None = None, **kwargs: Any) -> BaseSpan | None:
        if isinstance(instance, BaseSynthesizer) and _method(id_) in _SYNTHESIZE:
            args = bound_args.arguments
            query = args.get("query")
            question = query.query_str if isinstance(query, QueryBundle) else str(query)
            _synthesis.set(Synthesis(question=question, nodes=tuple(args.get("nodes") or ())))
        return None

    def prepare_to_exit_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any | None = None, result: Any | None = None,
                             **kwargs: Any) -> BaseSpan | None:
        if isinstance(instance, BaseSynthesizer) and _method(id_) in _SYNTHESIZE:
            _close_synthesis()
        elif isinstance(instance, BaseChatEngine) and _method(id_) in _CHAT:
            _give_chat_metadata(result)
        return None

    def prepare_to_drop_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any | None = None, err: BaseException | None = None,
                             **kwargs: Any) -> BaseSpan | None:
        if isinstance(instance, BaseSynthesizer) and _method(id_) in _SYNTHESIZE:
            _close_synthesis()
        return None


def _method(span_id: str) -> str:
    """``"CompactAndRefine.synthesize-<uuid>"`` -> ``"synthesize"``."""
    return span_id.split("-", 1)[0].rpartition(".")[2]


def _close_synthesis() -> None:
    synthesis = _synthesis.get()
    if synthesis is not None:
        synthesis.open = False


def _give_chat_metadata(result: Any) -> None:
    """A chat answer without metadata gets the ``nest_*`` metadata of the synthesized
    response whose text it is (offsets index the same text)."""
    answered = _answered.get()
    if (isinstance(result, AgentChatResponse) and result.metadata is None
            and answered is not None and "nest_spans" in (answered.metadata or {})
            and str(getattr(answered, "response", None)) == result.response):
        result.metadata = answered.metadata


def install() -> SpanBridge:
    """Register the bridge and the span reader on LlamaIndex's root dispatcher (once per
    process)."""
    with _install_lock:
        if not _installed:
            bridge, spans = SpanBridge(), SynthesisSpans()
            root = instrument.get_dispatcher()
            root.add_event_handler(bridge)
            root.add_span_handler(spans)
            _installed.append((bridge, spans))
        return _installed[0][0]


def remember_standalone(message: str, question: str) -> None:
    """Record the standalone question ``NestLLM`` made of a chat follow-up ``message``."""
    _standalone.set((message, question))


def standalone(question: str) -> str:
    """``question`` made standalone, when it is the follow-up ``NestLLM`` condensed last in
    this thread/task (the chat engine synthesizes over the raw message); else itself."""
    last = _standalone.get()
    return last[1] if last is not None and last[0] == question else question
