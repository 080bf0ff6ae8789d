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

Both are kept in context variables: the retrieval, the LLM call and the end of synthesis of
one query run in one thread (or one asyncio task), so concurrent queries never see each
other's nodes or spans. ``SynthesizeStartEvent`` clears the pending completion, so a response
only gets spans from a ``NestLLM`` call made while it was being synthesized. The handler is
registered once per process, when the first ``NestLLM`` is built (:func:`install`).
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
from llama_index.core.instrumentation.events.synthesis import (
    SynthesizeEndEvent,
    SynthesizeStartEvent,
)
from llama_index.core.schema import NodeWithScore

MAX_RECENT_NODES = 256  # candidates kept for mapping context chunks back to nodes


@dataclass
class Completion:
    """One ``NestLLM`` call: its metadata dict (filled while decoding) and its text."""

    metadata: dict[str, Any]
    streaming: bool
    text: list[str] = field(default_factory=list)  # pieces, joined when done


_recent_nodes: ContextVar[tuple[NodeWithScore, ...]] = ContextVar("nest_recent_nodes",
                                                                 default=())
_pending: ContextVar[Completion | None] = ContextVar("nest_pending_completion", default=None)
# a streaming response whose LLM call has not started yet (stock synthesizers call
# ``llm.stream`` lazily, when the response generator is first read)
_waiting: ContextVar[Any] = ContextVar("nest_waiting_response", default=None)
_install_lock = threading.Lock()
_installed: list[SpanBridge] = []


def recent_nodes() -> tuple[NodeWithScore, ...]:
    """Nodes retrieved lately in this thread/task, newest first."""
    return _recent_nodes.get()


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
    return True


def install() -> SpanBridge:
    """Register the bridge on LlamaIndex's root dispatcher (once per process)."""
    with _install_lock:
        if not _installed:
            bridge = SpanBridge()
            instrument.get_dispatcher().add_event_handler(bridge)
            _installed.append(bridge)
        return _installed[0]
