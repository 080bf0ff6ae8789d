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


class QuestionLookup:
    """Drafts from the user's own words (beyond the paper; ``NestConfig.question_drafts``).

    Answers restate the question ("The ISO 3166-1 numeric code of Romania is ..."): those
    tokens are in the question, not in any passage, so Nest's copy path cannot draft them
    and the LM writes them one forward each. As transformers' prompt lookup, the last
    output tokens and the token decoding picks now are looked up in the question and what
    follows is drafted after that token; the draft is kept while each token is the one
    decoding would pick anyway (exact, not relaxed: the user's words are no evidence), so
    the answer is the same, only sooner. The tokens are the user's, so they cite nothing.

    Tokens are matched by ``key`` (:meth:`LanguageModel.token_word`: "The" matches
    " the"), so the answer's capitalised first word finds the question's. A match holds
    the picked token and at least one output token before it; at the answer's start the
    picked token alone.
    """

    def __init__(self, question_ids: list[int], key: Callable[[int], Hashable] | None = None,
                 max_ngram: int = 3) -> None:
        self.question = question_ids
        self.key = key or (lambda t: t)
        self.question_keys = [self.key(t) for t in question_ids]
        self.max_ngram = max_ngram

    def propose(self, output: list[int], top: int, length: int) -> list[int]:
        """``[top, ...]``: ``top`` (the token decoding picks next) and up to ``length - 1``
        question tokens after the latest longest match of ``output``'s tail + ``top``;
        ``[]`` when nothing follows a match."""
        seq = [*output[-(self.max_ngram - 1):], top] if self.max_ngram > 1 else [top]
        keys = [self.key(t) for t in seq]
        q = self.question_keys
        for n in range(len(keys), min(2, len(keys)) - 1, -1):
            tail = keys[-n:]
            # the latest occurrence with a continuation, so "of X" drafts what follows X
            for start in range(len(q) - n - 1, -1, -1):
                if q[start:start + n] == tail:
                    return [top, *self.question[start + n:start + n + length - 1]]
        return []
