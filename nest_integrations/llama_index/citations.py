"""Decoder chunks -> response text (optionally with ``[n]`` markers) and span dicts.

Both the streaming and the non-streaming paths run through :class:`SpanAssembler`, so the
two cannot drift: the non-streaming response is the joined stream.

Markers follow ``CitationQueryEngine``'s convention: ``[n]`` refers to ``source_nodes[n-1]``
and follows the cited text (``"... founded in 1987 [1]."``). A span only ends when the next
chunk does not continue it, so with markers on, the whitespace after a copied piece is held
back until the next chunk (or the end) shows where the marker goes.

Only citations are listed or marked (:mod:`nest_core.citations`, the rule every surface
shares): a copied span is judged by :func:`~nest_core.citations.is_citation` when it closes,
which is when the text after it is known, so a lone "in", ".", "7" or the first half of a
word gets neither a marker nor a dict. ``NestChunk.span`` alone is provenance, not a citation.

Matched spans (text the LM wrote that a node holds verbatim, ``NestResult.matches``) are
only known once decoding ends, after the text has streamed out: :meth:`SpanAssembler.matches`
gives the dicts of those ``NestResult.cited_spans()`` keeps (``kind="matched"``, merged as it
merges them, offsets shifted past the markers already emitted); no marker is inserted for
them. When the decoder finds the answer unsupported by the context it showed
(``NestResult.support`` below :data:`~nest_core.citations.MIN_SUPPORT`, known at the end),
:meth:`finish` drops every citation, so a wrong answer keeps none. A marker already streamed
cannot be taken back, so with markers on a streamed answer keeps its spans (marker and dict
agree); ``hold=True`` (the non-streaming paths, which join the text anyway) emits all text at
:meth:`finish`, when that is known, and a wrong answer then has neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llama_index.core.schema import NodeWithScore

from nest_core.citations import MIN_SUPPORT, is_citation
from nest_core.types import NestChunk, NestResult, Span
from nest_integrations.llama_index.nodes import span_dict


@dataclass
class _OpenSpan:
    """The span being extended: the first and the latest chunk span it merges."""

    first: Span
    last: Span


class SpanAssembler:
    """Feeds on :class:`NestChunk` objects; returns the text to emit for each.

    ``spans`` (the list given, e.g. ``Response.metadata["nest_spans"]``) receives one dict
    per span as soon as the span is known to be complete. Output offsets in those dicts
    index the *emitted* text: with ``citation_markers=True`` that is the marked text.
    Positions are tracked in the decoder's plain text (``plain``); a marker is a pending
    insertion at a plain position, emitted when the output reaches it.
    """

    def __init__(self, nodes: Mapping[str, tuple[int, NodeWithScore]], spans: list[Any],
                 *, citation_markers: bool = False, hold: bool = False) -> None:
        self._nodes = nodes  # passage id -> (1-based source index, node)
        self._markers_on = citation_markers
        self._hold = hold  # emit nothing before finish()
        self.spans = spans
        self.plain = ""  # the decoder's text so far
        self._pos = 0  # plain characters already emitted
        self._markers: list[tuple[int, str]] = []  # (plain position, marker), ascending
        self._marker_chars_before = 0  # marker characters already emitted
        self._emitted: list[tuple[int, int]] = []  # (plain position, length) per marker
        self._open: _OpenSpan | None = None
        self.result: NestResult | None = None

    def feed(self, chunk: NestChunk) -> str:
        """Account for ``chunk``; return what may be emitted now (possibly ``""``)."""
        self.plain += chunk.text
        if chunk.result is not None:
            self.result = chunk.result
        span = chunk.span
        if span is not None and span.passage.id not in self._nodes:
            span = None  # not one of our passages: cite nothing rather than guess
        if span is not None and self._continues(span):
            assert self._open is not None
            self._open.last = span
        else:
            self._close()
            if span is not None:
                self._open = _OpenSpan(first=span, last=span)
        return "" if self._hold else self._flush()

    def finish(self) -> str:
        """Close the last span; return all remaining text and markers. An answer the shown
        context does not support keeps no span dict."""
        self._close()
        support = self.result.support if self.result is not None else None
        if support is not None and support < MIN_SUPPORT and (
                self._hold or not self._markers_on or not self._emitted):
            del self.spans[:]
            self._markers.clear()
        return self._flush()

    def matches(self) -> list[dict[str, Any]]:
        """The result's matched spans as ``span_dict`` entries (``kind="matched"``), offsets
        into the emitted text; call after :meth:`finish`. Spans of unknown passages are left
        out, as for copied spans."""
        if self.result is None:
            return []
        out = []
        for span in self.result.cited_spans():
            if span.kind != "matched" or span.passage.id not in self._nodes:
                continue
            index, scored = self._nodes[span.passage.id]
            # a marker at the span's start was emitted before it; none falls inside it
            start = span.out_start + sum(n for at, n in self._emitted if at <= span.out_start)
            out.append(span_dict(span, scored, index, out_start=start,
                                 out_end=start + (span.out_end - span.out_start)))
        return out

    # --- internals -------------------------------------------------------------------------
    def _flush(self) -> str:
        """Emit plain text up to what is safe, with the markers that fall inside it."""
        limit = len(self.plain)
        if self._markers_on and self._open is not None:
            # whether a marker follows the open span is unknown until the next chunk
            limit = min(limit, self._open.last.out_end)
        out = []
        while self._markers and self._markers[0][0] <= limit:
            at, marker = self._markers.pop(0)
            out.append(self.plain[self._pos:at])
            out.append(marker)
            self._pos = max(self._pos, at)
            self._marker_chars_before += len(marker)
            self._emitted.append((at, len(marker)))
        if limit > self._pos:
            out.append(self.plain[self._pos:limit])
            self._pos = limit
        return "".join(out)

    def _continues(self, span: Span) -> bool:
        """Same passage, next token, and the text between matches the passage's text."""
        if self._open is None:
            return False
        last = self._open.last
        if span.passage.id != last.passage.id or span.token_start != last.token_end:
            return False
        if span.src_start < last.src_end:
            return False
        gap_out = self.plain[last.out_end:span.out_start]
        return gap_out == span.passage.text[last.src_end:span.src_start]

    def _close(self) -> None:
        """Record the open span as a dict and queue its marker, if it is a citation (the
        text after it is known now: the chunk that did not continue it, or the end)."""
        if self._open is None:
            return
        first, last = self._open.first, self._open.last
        self._open = None
        passage = first.passage
        index, scored = self._nodes[passage.id]
        merged = Span(text=passage.text[first.src_start:last.src_end],
                      out_start=first.out_start, out_end=last.out_end, passage=passage,
                      src_start=first.src_start, src_end=last.src_end,
                      token_start=first.token_start, token_end=last.token_end)
        if not is_citation(merged, self.plain):
            return
        # markers already placed at or before the span start shift it right
        shift = self._marker_chars_before + sum(
            len(m) for at, m in self._markers if at <= first.out_start)
        start = first.out_start + shift
        self.spans.append(span_dict(merged, scored, index, out_start=start,
                                    out_end=start + (last.out_end - first.out_start)))
        if self._markers_on:
            self._markers.append((last.out_end, f" [{index}]"))
