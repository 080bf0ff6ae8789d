"""Where drafts come from: retrieved spans (the paper) and two lookups beyond it.

A drafter proposes a :class:`Draft` or ``None``, and ``None`` means "decode one token
normally" (as transformers' ``CandidateGenerator``); after each step it hears how much of
the chosen draft was kept (:meth:`Drafter.update`). :class:`Drafters` asks its drafters in
order and takes the first draft.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from nest_core.attribution import NO_SOURCE
from nest_core.decoding.beliefs import Belief
from nest_core.token_index import TokenIndex

DraftSource = Literal["knn", "passage", "prompt"]
SHORT_DRAFT = 4  # tokens drafted on a match of the picked token alone


@dataclass(frozen=True)
class Draft:
    """Tokens to verify in one forward; ``rows[i]``: the index row ``tokens[i]`` is copied
    from, or ``NO_SOURCE``; ``exact``: kept only where each token is the one decoding
    would pick anyway (lookups: words found are no evidence), else relaxed verification."""

    tokens: list[int]
    rows: list[int]
    exact: bool
    source: DraftSource


class Drafter(Protocol):
    def propose(self, belief: Belief, output: list[int], budget: int) -> Draft | None:
        """A draft starting with ``belief.top_token``, at most ``budget`` tokens, or ``None``."""
        ...

    def update(self, draft: Draft | None, kept: int) -> None:
        """The step's draft (any drafter's, or ``None``) kept its first ``kept`` tokens."""
        ...


class Drafters:
    """The drafters of one generation, asked in order: the first draft wins."""

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        self.drafters = list(drafters)

    def propose(self, belief: Belief, output: list[int], budget: int) -> Draft | None:
        for drafter in self.drafters:
            draft = drafter.propose(belief, output, budget)
            if draft is not None:
                return draft
        return None

    def update(self, draft: Draft | None, kept: int) -> None:
        for drafter in self.drafters:
            drafter.update(draft, kept)


class RetrievedSpans:
    """Dynamic span selection (Sec. 3.3, Eqs. 5-6) plus streaming continuation (Sec. 3.4).

    Span start follows the paper, not the official code: w = argmax p_M, then the nearest
    retrieved neighbour whose value is w (max-pooling of Eq. 5: the nearest one has the
    largest kNN weight). The draft's first token is therefore always the judge's choice.
    A fully kept draft is continued from its passage at the next step, and drafts double
    in length (up to ``max_length``) while they are kept whole.

    ``span_passages`` (beyond the paper; ``None`` = any passage): a span may only start in
    one of the top-m passages in retrieval order, so copying follows the passages the
    retriever ranked for the question rather than any passage sharing the next token. The
    kNN distribution still sees every passage.

    ``start_rows`` (beyond the paper; ``None`` = any row): a bool mask ``(N,)`` of the rows
    a span may start at: the question's focus sentences (:mod:`nest_core.focus`), so a span
    starts where the question's answer is read, not wherever the next token occurs.
    """

    def __init__(self, index: TokenIndex, span_threshold: float, *, initial_length: int,
                 max_length: int, span_passages: int | None = None,
                 start_rows: torch.Tensor | None = None) -> None:
        self.index, self.span_threshold = index, span_threshold
        self.span_passages, self.start_rows = span_passages, start_rows
        self.initial_length, self.max_length = initial_length, max_length
        self.length = initial_length  # of the next draft
        self.stream_row: int | None = None  # the last copied row of a draft kept whole

    def propose(self, belief: Belief, output: list[int], budget: int) -> Draft | None:
        rows = self.rows(belief, self.stream_row, min(self.length, budget))
        if not rows:
            return None
        return Draft(self.index.values[rows].tolist(), rows, exact=False, source="knn")

    def update(self, draft: Draft | None, kept: int) -> None:
        if draft is not None and kept == len(draft.tokens):
            # kept whole: stream on from the same passage (a lookup is looked up again)
            last = draft.rows[-1]
            self.stream_row = last if last != NO_SOURCE and not draft.exact else None
            self.length = min(2 * self.length, self.max_length)
            return
        self.stream_row = None
        if draft is not None:  # cut: start short again
            self.length = self.initial_length

    def rows(self, belief: Belief, stream_row: int | None, length: int) -> list[int]:
        """Rows of the token index whose values form the draft, or ``[]``."""
        if stream_row is not None:
            # Streaming: the last token was copied and accepted; keep reading its passage.
            rows = self.index.continuation(stream_row, length)
            if rows:
                return rows
        if belief.neighbors is None or belief.values is None \
                or belief.lam >= self.span_threshold:
            return []  # Eq. 6: λ ≥ δ, the LM is trusted, emit a single token
        carries = belief.values == belief.top_token  # [k]
        if self.span_passages is not None:
            rank = self.index.passage_of[belief.neighbors.rows[0].cpu()]  # [k]
            carries &= (rank < self.span_passages).to(carries.device)
        if self.start_rows is not None:
            carries &= self.start_rows[belief.neighbors.rows[0]].to(carries.device)
        carriers = carries.nonzero()
        if carriers.numel() == 0:
            return []  # no retrieved token carries the judge's choice: nothing to copy
        start = int(belief.neighbors.rows[0, int(carriers[0, 0])])
        return [start, *self.index.continuation(start, length - 1)]


class PassageLookup:
    """Spans that start where the output's last tokens and the picked token are a passage's
    (beyond the paper; ``NestConfig.passage_drafts``).

    The answer often repeats the focus sentence where retrieval is not confident (λ ≥ δ),
    or where no neighbour carries the picked token: the LM then writes the passage's words
    one forward each, and they are cited only by matching after the answer. This starts a
    span at a row that may start one (``allowed``: the focus sentence, the top passages)
    whose token is the picked one, preferring the row whose preceding tokens repeat the
    output's longest (up to ``max_ngram - 1``), the first in reading order among equals, and
    drafts the passage from there. The draft is exact, so the answer is the same; the
    tokens are copied from that row's passage and cited to it. A match of the picked token
    alone, after the answer's first token, drafts :data:`SHORT_DRAFT` tokens at most.
    """

    def __init__(self, index: TokenIndex, allowed: torch.Tensor, max_length: int,
                 max_ngram: int = 3) -> None:
        self.index, self.max_length, self.max_ngram = index, max_length, max_ngram
        self.values = index.values.tolist()
        self.first = index.row_start[index.passage_of].tolist()  # [N]: its passage's first row
        self.rows_of: dict[int, list[int]] = {}  # token -> rows that may start a span with it
        for row in allowed.nonzero().flatten().tolist():  # ascending: reading order
            self.rows_of.setdefault(self.values[row], []).append(row)

    def propose(self, belief: Belief, output: list[int], budget: int) -> Draft | None:
        if budget < 2:
            return None
        rows = self.rows(output, belief.top_token, min(self.max_length, budget))
        if not rows:
            return None
        return Draft([self.values[r] for r in rows], rows, exact=True, source="passage")

    def update(self, draft: Draft | None, kept: int) -> None:
        pass

    def rows(self, output: list[int], top: int, length: int) -> list[int]:
        best, best_n = None, 0
        rows = self.rows_of.get(top, [])
        active = self.index.active[rows].tolist() if rows else []
        for row, ok in zip(rows, active, strict=True):
            if not ok:
                continue
            n = 1
            while (n < self.max_ngram and n <= len(output) and row - n >= self.first[row]
                   and self.values[row - n] == output[-n]):
                n += 1
            if n > best_n:
                best, best_n = row, n
        if best is None:
            return []
        if best_n == 1 and output:
            length = min(length, SHORT_DRAFT)
        return [best, *self.index.continuation(best, length - 1)]


class PromptLookup:
    """Drafts from the prompt's own words (beyond the paper; ``NestConfig.question_drafts``).

    Answers restate the question ("The ISO 3166-1 numeric code of Romania is ...") and
    repeat the background shown ("... is 642."): the LM would write those tokens one forward
    each where Nest's copy path drafts nothing. As transformers' prompt lookup, the last
    output tokens and the token decoding picks now are looked up in the prompt and what
    follows is drafted after that token; the draft is exact, so the answer is the same, only
    sooner. Such tokens cite nothing by being drafted: where they repeat a passage, matching
    cites them after the answer.

    Tokens are matched by ``key`` (:meth:`LanguageModel.token_word`: "The" matches
    " the"), so the answer's capitalised first word finds the question's. The latest,
    longest match wins (for the answer's first word the earliest: a restatement follows the
    question from its start); a match of the picked token alone (after the first token)
    drafts :data:`SHORT_DRAFT` tokens at most: weak evidence, and a forward of a few tokens
    costs about what a 1-token forward does (``python -m benchmarks.bench_forward``).
    """

    def __init__(self, prompt_ids: list[int], max_length: int,
                 key: Callable[[int], Hashable] | None = None, max_ngram: int = 3) -> None:
        self.prompt, self.max_length = prompt_ids, max_length
        self.key = key or (lambda t: t)
        self.prompt_keys = [self.key(t) for t in prompt_ids]
        self.max_ngram = max_ngram

    def propose(self, belief: Belief, output: list[int], budget: int) -> Draft | None:
        if budget < 2:
            return None
        tokens = self.tokens(output, belief.top_token, min(self.max_length, budget))
        return Draft(tokens, [NO_SOURCE] * len(tokens), exact=True,
                     source="prompt") if tokens else None

    def update(self, draft: Draft | None, kept: int) -> None:
        pass

    def tokens(self, output: list[int], top: int, length: int) -> list[int]:
        """``[top, ...]``: ``top`` (the token decoding picks next) and up to ``length - 1``
        prompt tokens after the latest longest match of ``output``'s tail + ``top``;
        ``[]`` when nothing follows a match."""
        seq = [*output[-(self.max_ngram - 1):], top] if self.max_ngram > 1 else [top]
        keys = [self.key(t) for t in seq]
        q = self.prompt_keys
        for n in range(len(keys), 0, -1):
            tail = keys[-n:]
            if n == 1 and output:
                length = min(length, SHORT_DRAFT)
            # the latest occurrence with a continuation, so "of X" drafts what follows X;
            # the answer's first word the earliest: a restatement follows the question
            # from its start ("The ISO 15924 code of the Cham script", not "The Cham ...")
            starts = range(len(q) - n - 1, -1, -1)
            for start in (reversed(starts) if not output else starts):
                if q[start:start + n] == tail:
                    return [top, *self.prompt[start + n:start + n + length - 1]]
        return []
