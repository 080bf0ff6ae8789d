"""Where drafts come from, and what the decoder believes about the next token.

The loop only asks a proposer for rows of the token index; "no draft" means "decode one
token normally" (as transformers' CandidateGenerator).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from nest_core import mixture
from nest_core.token_index import Neighbors, TokenIndex


@dataclass(frozen=True)
class Belief:
    """The mixture p_M at one position, kept sparse (see :func:`mixture.sparse_mixture`).

    ``top_token``/``top_prob``: argmax and max of p_M; ``lam``: λ (1.0 without retrieval);
    ``neighbors``: this position's search result (a batch of one) or ``None``;
    ``logits`` ``(V,)`` (raw), ``temperature`` and ``lse`` give p_LM; ``scaled_logits``:
    ``logits / temperature`` when the mixture path already computed it, else ``None``
    (:meth:`scaled` divides on demand: the LM judge only needs one entry of it);
    ``weights``/``values`` ``(k,)`` give p_kNN; ``logits``/``hidden`` are kept to rescore
    after keys are masked; ``lm_ends``: the LM's own argmax here is an end-of-answer token
    (used with ``end_with_lm``); ``lm_max``: the largest scaled logit. With
    ``verify_against="lm"`` p_M is never consulted: ``top_prob`` is NaN and ``lse`` is
    ``None`` (drafts are judged by :meth:`lm_ratio`, in which the normaliser cancels).
    """

    top_token: int
    top_prob: float
    lam: float
    neighbors: Neighbors | None
    scaled_logits: torch.Tensor | None
    lse: torch.Tensor | None
    weights: torch.Tensor | None
    values: torch.Tensor | None
    logits: torch.Tensor
    hidden: torch.Tensor
    lm_ends: bool = False
    lm_max: float | None = None
    temperature: float = 1.0

    def scaled(self) -> torch.Tensor:
        """``(V,)`` logits / LM temperature: p_LM's logits."""
        if self.scaled_logits is not None:
            return self.scaled_logits
        return self.logits / self.temperature

    def probability(self, token: int) -> torch.Tensor:
        """p_M(token) at this position, a 0-d tensor (sparse: no vocabulary-sized work)."""
        one = torch.tensor([token])
        scaled = self.scaled()
        lse = self.lse if self.lse is not None else torch.logsumexp(scaled, -1)
        return mixture.token_probability(
            scaled[None], lse[None], torch.tensor([self.lam]),
            None if self.weights is None else self.weights[None],
            None if self.values is None else self.values[None], one)[0]

    def lm_ratio(self, token: int) -> float:
        """p_LM(token) / max p_LM at this position: Eq. 7's ratio when p_LM is the judge
        (exp of a scaled-logit difference: no logsumexp, and no division of the whole row:
        ``logits[token] / temperature`` is the very float ``scaled()[token]`` holds)."""
        if self.lm_max is None:
            scaled = self.scaled()
            return float(torch.exp(scaled[token] - float(scaled.max())))
        return float(torch.exp(self.logits[token] / self.temperature - self.lm_max))


class SpanProposer(Protocol):
    def propose(self, belief: Belief, stream_row: int | None, length: int) -> list[int]:
        """Rows of the token index whose values form the draft, or ``[]`` for one LM token."""
        ...


class RetrievedSpanProposer:
    """Dynamic span selection (Sec. 3.3, Eqs. 5-6) plus streaming continuation (Sec. 3.4).

    Span start follows the paper, not the official code: w = argmax p_M, then the nearest
    retrieved neighbour whose value is w (max-pooling of Eq. 5: the nearest one has the
    largest kNN weight). The draft's first token is therefore always the mixture's choice.

    ``span_passages`` (beyond the paper; ``None`` = any passage): a span may only start in
    one of the top-m passages in retrieval order, so copying follows the passages the
    retriever ranked for the question rather than any passage sharing the next token. The
    kNN distribution still sees every passage.

    ``start_rows`` (beyond the paper; ``None`` = any row): a bool mask ``(N,)`` of the rows
    a span may start at: the question's focus sentences (:mod:`nest_core.focus`), so a span
    starts where the question's answer is read, not wherever the next token occurs.
    """

    def __init__(self, index: TokenIndex, span_threshold: float,
                 span_passages: int | None = None, start_rows: torch.Tensor | None = None
                 ) -> None:
        self.index = index
        self.span_threshold = span_threshold
        self.span_passages = span_passages
        self.start_rows = start_rows

    def propose(self, belief: Belief, stream_row: int | None, length: int) -> list[int]:
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
            return []  # no retrieved token carries the mixture's choice: nothing to copy
        start = int(belief.neighbors.rows[0, int(carriers[0, 0])])
        return [start, *self.index.continuation(start, length - 1)]


SHORT_DRAFT = 4  # tokens drafted on a match of the picked token alone


class PromptLookup:
    """Drafts from the prompt's own words (beyond the paper; ``NestConfig.question_drafts``).

    Answers restate the question ("The ISO 3166-1 numeric code of Romania is ...") and
    repeat the background shown ("... is 642."): the LM would write those tokens one forward
    each where Nest's copy path drafts nothing. As transformers' prompt lookup, the last
    output tokens and the token decoding picks now are looked up in the prompt and what
    follows is drafted after that token; the draft is kept while each token is the one
    decoding would pick anyway (exact, not relaxed: words found in the prompt are no
    evidence), so the answer is the same, only sooner. Such tokens cite nothing by being
    drafted: where they repeat a passage, matching cites them after the answer.

    Tokens are matched by ``key`` (:meth:`LanguageModel.token_word`: "The" matches
    " the"), so the answer's capitalised first word finds the question's. The latest,
    longest match wins (for the answer's first word the earliest: a restatement follows the
    question from its start); a match of the picked token alone (after the first token)
    drafts :data:`SHORT_DRAFT` tokens at most: weak evidence, and a forward of a few tokens
    costs about what a 1-token forward does (``python -m benchmarks.bench_forward``).
    """

    def __init__(self, prompt_ids: list[int], key: Callable[[int], Hashable] | None = None,
                 max_ngram: int = 3) -> None:
        self.prompt = prompt_ids
        self.key = key or (lambda t: t)
        self.prompt_keys = [self.key(t) for t in prompt_ids]
        self.max_ngram = max_ngram

    def propose(self, output: list[int], top: int, length: int) -> list[int]:
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


class PassageLookup:
    """Spans that start where the output's last tokens and the picked token are a passage's
    (beyond the paper; ``NestConfig.passage_drafts``).

    The answer often repeats the focus sentence where retrieval is not confident (λ ≥ δ),
    or where no neighbour carries the picked token: the LM then writes the passage's words
    one forward each, and they are cited only by matching after the answer. This starts a
    span at a row that may start one (``allowed``: the focus sentence, the top passages)
    whose token is the picked one, preferring the row whose preceding tokens repeat the
    output's longest (up to ``max_ngram - 1``), the first in reading order among equals, and
    drafts the passage from there. The draft is kept while each token is the one decoding
    would pick anyway (exact), so the answer is the same; the tokens are copied from that
    row's passage and cited to it. A match of the picked token alone, after the answer's
    first token, drafts :data:`SHORT_DRAFT` tokens at most.
    """

    def __init__(self, index: TokenIndex, allowed: torch.Tensor, max_ngram: int = 3) -> None:
        self.index = index
        self.max_ngram = max_ngram
        self.values = index.values.tolist()
        self.first = index.row_start[index.passage_of].tolist()  # [N]: its passage's first row
        self.rows_of: dict[int, list[int]] = {}  # token -> rows that may start a span with it
        for row in allowed.nonzero().flatten().tolist():  # ascending: reading order
            self.rows_of.setdefault(self.values[row], []).append(row)

    def propose(self, output: list[int], top: int, length: int) -> list[int]:
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
