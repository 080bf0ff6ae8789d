"""The answer as it is decided: token ids, where each was copied from, text, streamed chunks
and spans. :class:`Output` applies the stops and turns accepted tokens into chunks."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from nest_core.attribution import NO_SOURCE, OutputText, make_span, runs
from nest_core.decoding.stops import StopStrings, TokenStop
from nest_core.token_index import TokenIndex
from nest_core.types import DecodeStats, FinishReason, NestChunk, NestResult, Passage, Span


class Output:
    """The output of one generation.

    Output rule: ``decode(ids) == text`` at the end, always. A stop string ends the text
    at the end of the last token that lies wholly before it: the token it starts inside
    is dropped too, so the text may end a few characters before the stop string. Tokens
    that end on a partial character (byte-level BPE splits e.g. a CJK character over two
    tokens) when ``max_new_tokens`` or EOS ends the answer are kept, as in plain greedy
    decoding, and the text ends in U+FFFD just as ``decode(ids)`` does; spans cover the
    copied tokens whose characters are whole (:meth:`span_of`).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], index: TokenIndex | None, *,
                 token_stops: Sequence[TokenStop], stop_strings: StopStrings,
                 max_new_tokens: int, stats: DecodeStats, started: float) -> None:
        self.decode, self.index = decode, index
        self.token_stops, self.stop_strings = list(token_stops), stop_strings
        self.max_new_tokens, self.stats, self.started = max_new_tokens, stats, started
        self.ids: list[int] = []  # generated token ids
        self.rows: list[int] = []  # index row each token was copied from, or NO_SOURCE
        self.sources: list[str] = []  # which part proposed each token (DecodeStats)
        self.offsets = OutputText(decode)
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.streamed = 0  # tokens whose text was streamed
        self.finish: FinishReason | None = None

    @property
    def budget(self) -> int:
        return self.max_new_tokens - len(self.ids)

    def streams_first(self, draft: list[int]) -> bool:
        """Whether a draft's first token, already verified, may be accepted (and streamed)
        before the forward that judges the rest: the user sees it one forward sooner. Not
        when a stop that looks ahead (repetition) would cut the draft at that token: the
        cut would then drop it too, and whether it happens depends on how much of the
        draft is accepted."""
        return all(stop.keep(self.ids, draft) != 0
                   for stop in self.token_stops if stop.looks_ahead)

    def accept(self, tokens: list[int], rows: list[int], source: str = "lm"
               ) -> Iterator[NestChunk]:
        """Append decided tokens (proposed by ``source``) as the stops allow, and stream
        the new text."""
        for stop in self.token_stops:
            keep = stop.keep(self.ids, tokens)
            if keep is not None:
                tokens, rows, self.finish = tokens[:keep], rows[:keep], stop.reason
        tokens, rows = tokens[:self.budget], rows[:self.budget]
        self.ids += tokens
        self.rows += rows
        self.sources += [source] * len(tokens)
        self.stats.generated_tokens = len(self.ids)
        self.text = self.decode(self.ids)
        self.offsets.remember(len(self.ids), self.text)
        self.apply_stop_strings()
        if self.finish is None and len(self.ids) >= self.max_new_tokens:
            self.finish = "length"
        yield from self.pieces()

    def apply_stop_strings(self) -> None:
        at = self.stop_strings.find(self.text, self.sent)
        if at is None:
            return
        # drop the token the stop string starts in (see the class); streamed text is never
        # taken back: the stream holds whole tokens that may start a stop string
        self.keep_tokens(self.whole_boundary(at))
        self.finish = self.stop_strings.reason

    def keep_tokens(self, keep: int) -> None:
        """Truncate the output to its first ``keep`` tokens and their decoded text."""
        del self.ids[keep:], self.rows[keep:], self.sources[keep:]
        self.offsets.truncate(keep)
        self.text = self.decode(self.ids)
        self.offsets.remember(keep, self.text)
        self.stats.generated_tokens = len(self.ids)

    def whole_boundary(self, chars: int) -> int:
        """The most tokens (at least those streamed) that decode to whole characters and to
        at most ``chars`` characters."""
        t = len(self.ids)
        while t > self.streamed and (self.offsets.prefix_length(self.ids, t) > chars
                                     or not self.offsets.is_whole(self.ids, t)):
            t -= 1
        return t

    def pieces(self) -> Iterator[NestChunk]:
        """Chunks for the tokens not streamed yet, one per run: tokens copied from
        consecutive rows of one passage, or generated ones. Each chunk holds the text of its
        own tokens only, and its span when they were copied (a chunk of bare whitespace has
        none: spans exclude it). Until the answer ends, whole tokens that may start a stop
        string are held back (:meth:`safe_length`), as are tokens of a partial character; a
        character split over two runs is streamed with the run that completes it, and
        tokens that add no text ride with the next chunk (or the last one): the chunks'
        ``token_ids`` add up to the result's.
        """
        limit = len(self.ids) if self.finish else self.whole_boundary(self.safe_length())
        t = self.streamed
        while t < limit:
            end = t + 1
            while end < limit and self.same_run(end - 1, end):
                end += 1
            upto = (len(self.text) if self.finish and end == len(self.ids)
                    else self.offsets.prefix_length(self.ids, end))
            if upto > self.sent:  # else its tokens go with the next chunk, which has the text
                if not self.stats.first_token_seconds:
                    self.stats.first_token_seconds = time.perf_counter() - self.started
                yield NestChunk(text=self.text[self.sent:upto],
                                token_ids=self.ids[self.streamed:end], span=self.span_of(t, end))
                self.sent, self.streamed = upto, end
            t = end

    def same_run(self, a: int, b: int) -> bool:
        """Whether tokens ``a`` and ``b = a + 1`` belong to one run (see :meth:`pieces`)."""
        ra, rb = self.rows[a], self.rows[b]
        if ra == NO_SOURCE or rb == NO_SOURCE:
            return ra == rb
        assert self.index is not None
        return rb == ra + 1 and bool(self.index.passage_of[ra] == self.index.passage_of[rb])

    def span_of(self, t0: int, t1: int) -> Span | None:
        """The span of tokens ``t0:t1`` of one copied run (``None`` for generated ones).

        It ends with the run's last token that completes a character (a token leaving a
        partial character is not cited). A first character begun by tokens before the run
        is cited only when it is the source's character there; else the span starts after
        it. Either way ``make_span`` checks that output and source text are the same.
        """
        if self.index is None or self.rows[t0] == NO_SOURCE:
            return None
        while t1 > t0 and not self.offsets.is_whole(self.ids, t1):
            t1 -= 1
        span = (make_span(self.text, self.ids, self.rows, (t0, t1), self.index, self.offsets)
                if t1 > t0 else None)
        if span is None and not self.offsets.is_whole(self.ids, t0):
            while t0 < t1 and not self.offsets.is_whole(self.ids, t0):
                t0 += 1
            if t0 < t1:
                span = make_span(self.text, self.ids, self.rows, (t0, t1), self.index,
                                 self.offsets)
        return span

    def safe_length(self) -> int:
        """Text that can be streamed now: hold back a tail that may start a stop string
        (looked for in the text without its dangling partial character, if any)."""
        text = self.text[:self.offsets.prefix_length(self.ids, len(self.ids))]
        return len(text) - self.stop_strings.held(text)

    def final_chunk(self, passages: list[Passage], prompt_truncated: bool) -> NestChunk:
        """The rest of the text, and the result."""
        stats = self.stats
        spans = [s for s in (self.span_of(*r) for r in runs(self.rows, self.index))
                 if s is not None] if self.index is not None else []
        stats.copied_tokens = sum(s.num_tokens for s in spans)
        stats.tokens_by_source = dict(Counter(self.sources))
        stats.total_seconds = time.perf_counter() - self.started
        stats.first_token_seconds = stats.first_token_seconds or stats.total_seconds
        result = NestResult(text=self.text, token_ids=list(self.ids), spans=spans,
                            passages=passages, stats=stats,
                            finish_reason=self.finish or "length",
                            prompt_truncated=prompt_truncated)
        rest, rest_ids = self.text[self.sent:], self.ids[self.streamed:]
        self.sent, self.streamed = len(self.text), len(self.ids)
        return NestChunk(text=rest, token_ids=rest_ids, span=None, result=result)
