"""Hybrid retrieval: the store's nearest passages, re-ranked by the question's own words.

Beyond the paper (Nest retrieves the top-b passages by embedding). Document QA asks about
names and codes, which sentence embeddings blur: the passage that names "Northern Bontok"
can rank below 150 others about languages. :class:`LexicalRerank` asks the wrapped source
for a wider pool (``pool`` passages, cheap: no LM work is done per retrieved passage) and
keeps the ``k`` that hold the question's rare words best
(:func:`nest_core.focus.rank_passages`), the store's order deciding among equals. Only the
kept ``k`` are encoded into the span datastore, so the pool costs milliseconds.
"""

from __future__ import annotations

from nest_core.focus import rank_passages
from nest_core.stores.sources.base import PassageSource, check_query
from nest_core.types import Passage

DEFAULT_POOL = 200  # passages asked of the store per query (dev: gold in the top 10 82% -> 96%)


class LexicalRerank:
    """A :class:`~nest_core.stores.sources.base.PassageSource` over ``source``: ``retrieve(q, k)``
    takes the store's top ``max(k, pool)`` and returns the ``k`` best re-ranked."""

    def __init__(self, source: PassageSource, pool: int = DEFAULT_POOL) -> None:
        if not isinstance(source, PassageSource):
            msg = (f"source must have retrieve(query, k) and aretrieve(query, k), got "
                   f"{type(source).__name__}")
            raise TypeError(msg)
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            msg = f"pool={pool!r} must be a positive integer"
            raise ValueError(msg)
        self.source, self.pool = source, pool

    def retrieve(self, query: str, k: int) -> list[Passage]:
        check_query(query, k)
        return self._best(query, self.source.retrieve(query, max(k, self.pool)), k)

    async def aretrieve(self, query: str, k: int) -> list[Passage]:
        check_query(query, k)
        return self._best(query, await self.source.aretrieve(query, max(k, self.pool)), k)

    @staticmethod
    def _best(query: str, found: list[Passage], k: int) -> list[Passage]:
        return [found[i] for i in rank_passages(query, found)[:k]]
