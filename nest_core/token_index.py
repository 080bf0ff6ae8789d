"""The per-query token datastore: rows of all retrieved passages, searched by exact L2 kNN."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nest_core.encoding import EncodedPassage
from nest_core.types import Passage


@dataclass(frozen=True)
class Neighbors:
    """Result of one batched search; rows sorted by ascending distance, all finite.

    ``dist2``: ``(Q, k)`` float32 squared L2 distances; ``rows``: ``(Q, k)`` int64 row ids.
    """

    dist2: torch.Tensor
    rows: torch.Tensor


class TokenIndex:
    """Concatenation of the encoded passages of one query.

    A row is *active* while it may still be retrieved or copied: its value is passage text
    (not title/BOS), fits the LM's vocabulary, and has not been masked after being copied.
    Search is an exact ``matmul + topk`` in float32 (cdist is ~6x slower on CPU).
    """

    def __init__(self, passages: Sequence[Passage], encoded: Sequence[EncodedPassage],
                 vocab_size: int, device: torch.device | str = "cpu") -> None:
        if len(passages) != len(encoded):
            msg = f"{len(passages)} passages but {len(encoded)} encodings"
            raise ValueError(msg)
        self.passages = list(passages)
        dim = next((e.keys.shape[1] for e in encoded if e.num_rows), 0)
        sizes = [e.num_rows for e in encoded]
        self.keys = (torch.cat([e.keys for e in encoded if e.num_rows]).to(device, torch.float32)
                     if dim else torch.zeros(0, 0, device=device))  # [N, D]
        self.key_sq = (self.keys * self.keys).sum(-1)  # [N]
        self.values = (torch.cat([e.values for e in encoded]).to(device) if sizes
                       else torch.zeros(0, dtype=torch.long, device=device))  # [N]
        self.char_spans = (torch.cat([e.char_spans for e in encoded]) if sizes
                           else torch.zeros(0, 2, dtype=torch.int32))  # [N, 2], on CPU
        counts = torch.tensor(sizes, dtype=torch.long)
        self.passage_of = torch.repeat_interleave(torch.arange(len(sizes)), counts)  # [N]
        self.row_start = torch.cumsum(counts, 0) - counts  # [P] first row of each passage
        self.active = ((self.char_spans[:, 0] >= 0) & (self.values.cpu() < vocab_size)) \
            .to(device)  # [N]
        self.dim = dim
        self._count_active()

    def _count_active(self) -> None:
        # read on every search: kept, and refreshed by mask() (the only writer of active)
        self._num_active = int(self.active.sum())
        self._inactive = ~self.active[None, :]  # [1, N]

    @property
    def num_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_active(self) -> int:
        return self._num_active

    def search(self, queries: torch.Tensor, k: int) -> Neighbors | None:
        """The ``min(k, active rows)`` nearest active rows for each query ``(Q, D)``.

        Clamping k to the active rows keeps every returned distance finite, so the
        confidence ratio never sees an infinite "farthest" neighbour (PAPER.md pitfall 2).
        """
        if self.num_active == 0:
            return None
        return self.nearest(self.distances(queries), k)

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances ``(Q, N)`` of queries ``(Q, D)`` to every row; ``inf`` on
        inactive rows. :meth:`search` is ``nearest(distances(q), k)``; a caller that may
        not need the sorted neighbours (the decoder, when λ alone says "no span") reads
        the few order statistics it needs from these without a top-k."""
        q = queries.to(self.keys.device, torch.float32)  # [Q, D]
        # ||q - k||^2 = ||k||^2 - 2 q.k + ||q||^2, computed in float32, in place: -2 q.k
        # is exact and addition commutes, so the floats are those of the expression
        d2 = (q @ self.keys.T).mul_(-2.0).add_(self.key_sq).add_((q * q).sum(-1, keepdim=True))
        return d2.clamp_min_(0.0).masked_fill_(self._inactive, float("inf"))  # [Q, N]

    def nearest(self, d2: torch.Tensor, k: int) -> Neighbors | None:
        """The ``min(k, active rows)`` smallest of :meth:`distances` ``d2``, sorted."""
        n_active = self.num_active
        if n_active == 0:
            return None
        top = torch.topk(d2, min(k, n_active), dim=-1, largest=False, sorted=True)
        return Neighbors(dist2=top.values, rows=top.indices)

    def rows_within(self, ranges: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Bool mask ``(N,)`` of the rows whose value overlaps one of ``ranges``:
        ``(passage index, start char, end char)`` of that passage's text."""
        out = torch.zeros(self.num_rows, dtype=torch.bool)
        for passage, a, b in ranges:
            lo, hi = self.rows_of(passage)
            spans = self.char_spans[lo:hi]  # [n, 2]
            out[lo:hi] |= (spans[:, 1] > a) & (spans[:, 0] < b) & (spans[:, 0] >= 0)
        return out.to(self.values.device)

    def rows_of(self, passage: int) -> tuple[int, int]:
        """The row range ``[start, end)`` of passage number ``passage``."""
        start = int(self.row_start[passage])
        end = (int(self.row_start[passage + 1]) if passage + 1 < len(self.row_start)
               else self.num_rows)
        return start, end

    def continuation(self, row: int, n: int) -> list[int]:
        """Up to ``n`` rows following ``row`` in its passage, stopping at the passage end or
        at the first inactive row (already copied text is never proposed twice)."""
        _, end = self.rows_of(int(self.passage_of[row]))
        stop = min(row + 1 + n, end)
        active = self.active[row + 1:stop].tolist()
        out = []
        for offset, ok in enumerate(active):
            if not ok:
                break
            out.append(row + 1 + offset)
        return out

    def mask(self, rows: Sequence[int]) -> None:
        """Never retrieve or propose these rows again in this generation (paper Sec. 3.4)."""
        if rows:
            self.active[torch.tensor(list(rows), dtype=torch.long)] = False
            self._count_active()

    def row_in_passage(self, row: int) -> int:
        return row - int(self.row_start[int(self.passage_of[row])])

    def source(self, row: int) -> tuple[Passage, int, int]:
        """The passage of ``row`` and the character offsets of its value token."""
        start, end = self.char_spans[row].tolist()
        return self.passages[int(self.passage_of[row])], int(start), int(end)
