"""From per-token provenance to :class:`Span` objects with exact character offsets.

Rule for offsets: a span's output slice is the decoded text its tokens added, its source
slice runs from the first copied token's start to the last one's end in ``passage.text``;
both are stripped of surrounding whitespace, and the span is kept only when the two
stripped slices are identical (a tokenizer that normalises text, e.g. collapsing spaces,
can make them differ: such a run is dropped from attribution rather than cited wrongly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from nest_core.token_index import TokenIndex
from nest_core.types import Span

logger = logging.getLogger(__name__)

NO_SOURCE = -1


class OutputText:
    """Incrementally decoded output with stable character offsets per token prefix.

    Byte-level tokenizers can split a UTF-8 character over two tokens: the prefix then ends
    in U+FFFD until the rest arrives, so such a prefix's length is not trusted, and ``t`` is
    not a *whole* boundary (:meth:`is_whole`). A U+FFFD the model really wrote at the end
    looks the same and is treated the same way.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._prefix_len: dict[int, int] = {0: 0}
        self._whole: dict[int, bool] = {0: True}

    def prefix_length(self, ids: Sequence[int], t: int) -> int:
        """Characters of ``decode(ids[:t])`` that are final (no dangling partial character)."""
        if t not in self._prefix_len:
            self.remember(t, self._decode(ids[:t]))
        return self._prefix_len[t]

    def remember(self, t: int, text: str) -> None:
        """Record ``text``, the caller's ``decode(ids[:t])``, so it is not decoded again."""
        self._prefix_len[t] = len(text.rstrip("\ufffd"))
        self._whole[t] = self._prefix_len[t] == len(text)

    def is_whole(self, ids: Sequence[int], t: int) -> bool:
        """Whether ``decode(ids[:t])`` ends on a whole character, so that tokens ``:t`` and
        the text ``[:prefix_length(ids, t)]`` are exactly the same output."""
        self.prefix_length(ids, t)
        return self._whole[t]

    def truncate(self, t: int) -> None:
        self._prefix_len = {k: v for k, v in self._prefix_len.items() if k <= t}
        self._whole = {k: v for k, v in self._whole.items() if k <= t}


def runs(rows: Sequence[int], index: TokenIndex) -> list[tuple[int, int]]:
    """Maximal ``[start, end)`` token runs copied from consecutive rows of one passage."""
    out: list[tuple[int, int]] = []
    start = None
    for t, row in enumerate(rows):
        if row == NO_SOURCE:
            if start is not None:
                out.append((start, t))
            start = None
            continue
        if start is not None and (rows[t - 1] != row - 1
                                  or index.passage_of[row] != index.passage_of[rows[t - 1]]):
            out.append((start, t))
            start = t
        elif start is None:
            start = t
    if start is not None:
        out.append((start, len(rows)))
    return out


def make_span(text: str, ids: Sequence[int], rows: Sequence[int], run: tuple[int, int],
              index: TokenIndex, offsets: OutputText) -> Span | None:
    """The :class:`Span` for tokens ``run`` of the output, or ``None`` if it has no text."""
    t0, t1 = run
    out_start = offsets.prefix_length(ids, t0)
    out_end = min(offsets.prefix_length(ids, t1), len(text))
    passage, src_start, _ = index.source(rows[t0])
    _, _, src_end = index.source(rows[t1 - 1])
    out_start, out_end = _strip(text, out_start, out_end)
    src_start, src_end = _strip(passage.text, src_start, src_end)
    if out_end <= out_start or src_end <= src_start:
        return None
    if text[out_start:out_end] != passage.text[src_start:src_end]:
        logger.debug("dropping span %r: tokenizer normalised it to %r",
                     passage.text[src_start:src_end], text[out_start:out_end])
        return None
    return Span(text=text[out_start:out_end], out_start=out_start, out_end=out_end,
                passage=passage, src_start=src_start, src_end=src_end,
                token_start=t0, token_end=t1, source_row=index.row_in_passage(rows[t0]))


def build_spans(text: str, ids: Sequence[int], rows: Sequence[int], index: TokenIndex | None,
                offsets: OutputText) -> list[Span]:
    if index is None:
        return []
    spans = [make_span(text, ids, rows, r, index, offsets) for r in runs(rows, index)]
    return [s for s in spans if s is not None]


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
