"""Response objects the query engine returns outside the plain sync path: the async
non-streaming answer decoded in a worker thread, the stock "Empty Response", and a blocking
piece generator driven from a thread for ``AsyncStreamingResponse``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Any

from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.schema import NodeWithScore

from nest_core.types import Passage


class PendingText:
    """An async non-streaming answer: decoded in a worker thread, then closed by ``done``."""

    def __init__(self, engine: Any, query_str: str, passages: list[Passage],
                 kept: list[NodeWithScore], metadata: dict[str, Any],
                 sources: list[NodeWithScore], done: Any) -> None:
        self.engine, self.query_str, self.passages, self.kept = engine, query_str, passages, kept
        self.metadata, self.sources, self.done = metadata, sources, done

    async def run(self) -> RESPONSE_TYPE:
        decoder = await asyncio.to_thread(self.engine._decoder.get)
        pieces = self.engine._pieces(decoder, self.query_str, self.passages, self.kept,
                                     self.metadata, hold=True)
        text = await asyncio.to_thread("".join, pieces)
        return self.done(Response(text, source_nodes=self.sources, metadata=self.metadata))


def empty_answer(text: str, streaming: bool, use_async: bool,
                 extra: Sequence[NodeWithScore] | None) -> RESPONSE_TYPE:
    """The stock synthesizers' answer when no node is left: text only, no spans."""
    metadata: dict[str, Any] = {"nest_spans": [], "nest_matches": []}
    sources = list(extra or [])
    if not streaming:
        return Response(text, source_nodes=sources, metadata=metadata)
    if use_async:
        return AsyncStreamingResponse(response_gen=agen_of(text), source_nodes=sources,
                                      metadata=metadata)
    return StreamingResponse(response_gen=gen_of(text), source_nodes=sources,
                             metadata=metadata)


def gen_of(text: str) -> Generator[str, None, None]:
    yield text


async def agen_of(text: str) -> AsyncGenerator[str, None]:
    yield text
