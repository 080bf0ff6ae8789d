"""The passage-source protocol: stage 1 of Nest, ``query -> top-k passages``.

Anything with ``retrieve`` and ``aretrieve`` is a source, so the decoder never cares whether
passages come from memory, Chroma, FAISS or a framework retriever (those adapters live in
``nest_integrations``). Order matters, scores do not: each store scores differently
(squared L2, cosine distance, inner product), so the raw score rides along in
``Passage.score`` and the order is the store's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, runtime_checkable

from nest_core.types import Passage

logger = logging.getLogger(__name__)


class EmptyStoreError(ValueError):
    """The store holds no passages: retrieval has nothing to return (ingest first)."""


class UnsafeStoreError(ValueError):
    """Opening the store would unpickle a file (code execution); the caller did not opt in."""


@runtime_checkable
class PassageSource(Protocol):
    """``retrieve(query, k)`` returns at most ``k`` passages, best first."""

    def retrieve(self, query: str, k: int) -> list[Passage]: ...

    async def aretrieve(self, query: str, k: int) -> list[Passage]: ...


class SyncPassageSource:
    """Base for sources whose client is blocking: ``aretrieve`` runs ``retrieve`` in a worker
    thread so an event loop (a web server, LlamaIndex's async engine) is never blocked."""

    def retrieve(self, query: str, k: int) -> list[Passage]:
        raise NotImplementedError

    async def aretrieve(self, query: str, k: int) -> list[Passage]:
        return await asyncio.to_thread(self.retrieve, query, k)


def check_query(query: str, k: int) -> None:
    """Shared argument checks, so every source fails the same way."""
    if not isinstance(query, str) or not query.strip():
        msg = f"query must be a non-empty str, got {query!r:.60}"
        raise ValueError(msg)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        msg = f"k={k!r} must be a positive integer (the number of passages to return)"
        raise ValueError(msg)


def public_metadata(metadata: object) -> dict[str, object]:
    """Metadata without framework bookkeeping (LlamaIndex stores ``_node_content`` etc.)."""
    if not isinstance(metadata, dict):
        return {}
    return {k: v for k, v in metadata.items() if not str(k).startswith("_")}


def embedding_text(passage: Passage) -> str:
    """What gets embedded for a passage: title and text, as the LM will also read them."""
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


def drop_empty(passages: list[Passage], where: str) -> list[Passage]:
    """Passages with blank text cannot be retrieved or copied: skip them with a warning."""
    kept = [p for p in passages if p.text.strip()]
    if len(kept) != len(passages):
        empty = [p.id for p in passages if not p.text.strip()]
        logger.warning("%s: skipped %d passage(s) with no text (ids %s)", where, len(empty),
                       ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    return kept
