"""One loaded model over one store, shared by every request of ``nest serve`` and
``nest mcp``: retrieval for the question, then Nest's decoding over the passages."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from nest_core.app.openai_api import ChatRequest
from nest_core.prompts import find_question, with_question
from nest_core.types import NestChunk, NestResult, Passage

if TYPE_CHECKING:
    from nest_core.lm import LanguageModel
    from nest_core.stores.sources.base import PassageSource

logger = logging.getLogger(__name__)

SERVED_ALIAS = "nest"  # model name every client may send, whatever the model is


class AnswerService:
    """What every request shares: the store, the model, the decoder settings, the span
    datastore. Thread-safe: each request gets its own decoder state; retrieval is
    serialised (the embedding model and some stores are not safe to share). ``batching``:
    the requests decoding at once share each model forward (:mod:`nest_core.batching`)."""

    def __init__(self, source: PassageSource, lm: LanguageModel, *, k: int = 8,
                 config: Any = None, key_cache: Any = None, name: str | None = None,
                 batching: bool = False) -> None:
        from nest_core.decoder import NestDecoder
        from nest_core.stores.embeddings import default_embedding_function

        self.source, self.lm, self.k = source, lm, k
        self.decoder = NestDecoder(lm, config, key_cache=key_cache,
                                   embed=default_embedding_function(), batching=batching)
        self.name = name or lm.name
        self._retrieval = threading.Lock()

    @property
    def model_forwards(self) -> int | None:
        """Model calls run for the answers so far, several answers' forwards in one when
        batching (None without batching: every answer's forward is one call)."""
        return self.decoder.batcher.stats.forwards if self.decoder.batcher else None

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.name, SERVED_ALIAS)

    def stream(self, request: ChatRequest) -> tuple[list[Passage], Iterator[NestChunk]]:
        """Retrieve for the request's question, then a (lazy) stream of the answer. A
        question in a stuffed RAG prompt is found and answered as such (as ChatNest does);
        no passages means a plain LM answer with no citations."""
        found = find_question(request.messages)
        passages = self.retrieve(found.text, self.k)
        messages = (with_question(request.messages, found.stuffed)
                    if found.stuffed is not None and passages else request.messages)
        pieces = self.decoder.stream(messages, passages or None,
                                     max_new_tokens=request.max_tokens,
                                     stop=request.stop or None, question=found.stuffed)
        return passages, pieces

    def retrieve(self, query: str, k: int) -> list[Passage]:
        """The store's best ``k`` passages; none from an empty store (the answer is then the
        plain LM's, with no citations, rather than an error for every request)."""
        from nest_core.stores.sources.base import EmptyStoreError

        with self._retrieval:
            try:
                return self.source.retrieve(query, k)
            except EmptyStoreError:
                logger.warning("the store is empty: answering without passages")
                return []

    def answer(self, request: ChatRequest) -> tuple[list[Passage], NestResult]:
        passages, pieces = self.stream(request)
        for piece in pieces:
            if piece.result is not None:
                return passages, piece.result
        raise AssertionError("stream ended without a result")  # pragma: no cover
