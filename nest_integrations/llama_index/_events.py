"""The callback and instrumentation events a stock LlamaIndex engine emits, for Nest's own.

Stock engines report their work twice: to the legacy ``CallbackManager`` (what
``LlamaDebugHandler`` and most tracing integrations read: QUERY > RETRIEVE, SYNTHESIZE > LLM)
and to the instrumentation dispatcher (``QueryStartEvent``, ``SynthesizeStartEvent``,
``LLMCompletionStartEvent``...). Nest decodes itself instead of calling an ``LLM`` object, so
it emits the LLM pair here: once around the decoding, closing when the text is complete
(for a stream, when its generator is exhausted, as ``llm_completion_callback`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Any

import llama_index.core.instrumentation as instrument
from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.callbacks import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.llm import (
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)

dispatcher = instrument.get_dispatcher(__name__)


def llm_events(pieces: Iterator[str], *, callback_manager: CallbackManager, prompt: str,
               model_name: str, metadata: Callable[[], dict[str, Any]]
               ) -> Generator[str, None, None]:
    """Yield ``pieces`` unchanged between an LLM start and end event.

    ``metadata`` is read at the end (the spans are known then) and becomes the end event's
    ``CompletionResponse.additional_kwargs``, so handlers see what Nest copied.
    """
    dispatcher.event(LLMCompletionStartEvent(prompt=prompt, additional_kwargs={},
                                             model_dict={"model_name": model_name}))
    event_id = callback_manager.on_event_start(
        CBEventType.LLM, payload={EventPayload.PROMPT: prompt,
                                  EventPayload.MODEL_NAME: model_name})
    text = ""
    try:
        for piece in pieces:
            text += piece
            yield piece
    except Exception as err:
        callback_manager.on_event_end(CBEventType.LLM, payload={EventPayload.EXCEPTION: err},
                                      event_id=event_id)
        raise
    completion = CompletionResponse(text=text, additional_kwargs=_spans_only(metadata()))
    callback_manager.on_event_end(
        CBEventType.LLM, payload={EventPayload.PROMPT: prompt,
                                  EventPayload.COMPLETION: completion}, event_id=event_id)
    dispatcher.event(LLMCompletionEndEvent(prompt=prompt, response=completion))


def _spans_only(metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``nest_*`` entries of a response's metadata (not the per-node metadata)."""
    return {k: v for k, v in metadata.items() if str(k).startswith("nest_")}
