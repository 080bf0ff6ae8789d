"""Who judges a draft: what the decoder believes after each forward, and which drafted
tokens it keeps.

Two judges behind one protocol, :class:`Judge`, chosen once per generation
(:func:`nest_core.decoding.policy.plan`):

* :class:`MixtureJudge` (the paper): p_M = λ·p_LM + (1-λ)·p_kNN at every fed position
  (Eqs. 2-4), a single token is argmax p_M, a draft token passes relaxed verification on
  p_M (Eq. 7).
* :class:`LMJudge` (beyond the paper, ``verify_against="lm"``): p_LM judges. Inside a
  copied span the kNN neighbours are the span's own rows, so p_M ≈ p_kNN approves its own
  draft and copying runs on past the answer; p_LM only approves what the model would say.
  The kNN side still proposes spans (λ < δ, Eq. 6). :class:`LazyLMJudge` is the same judge
  with lossless shortcuts (searches skipped where no span could start, λ from two order
  statistics); :class:`LMJudge` is its exact reference.

How sure retrieval is (λ) is a strategy too: :class:`RelativeConfidence` (Eq. 4) or
:class:`FixedLambda` (kNN-LM).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Protocol

import torch

from nest_core.decoding import mixture
from nest_core.decoding.beliefs import Belief
from nest_core.token_index import Neighbors, TokenIndex
from nest_core.types import DecodeStats


# --- λ ----------------------------------------------------------------------------------------
class Confidence(Protocol):
    def of(self, hidden: torch.Tensor, found: Neighbors) -> torch.Tensor:
        """λ ``(T,)`` of the positions whose sorted neighbours are ``found``."""
        ...

    def quick(self, d2: torch.Tensor) -> torch.Tensor | None:
        """λ ``(T,)`` from unsorted distances ``d2`` ``(T, N)``, or ``None`` where it needs
        the sorted neighbours."""
        ...


class FixedLambda:
    """kNN-LM (Eq. 3): the same λ at every position."""

    def __init__(self, lam: float) -> None:
        self.lam = lam

    def of(self, hidden: torch.Tensor, found: Neighbors) -> torch.Tensor:
        return torch.full((hidden.shape[0],), self.lam)

    def quick(self, d2: torch.Tensor) -> torch.Tensor | None:
        return None


class RelativeConfidence:
    """Relative Retrieval Confidence (Eq. 4), ρ over the farthest of the r neighbours (the
    paper) or over the norms (``reference="norm"``, beyond the paper: see
    :func:`mixture.norm_reference`)."""

    def __init__(self, index: TokenIndex, offset: float, scale: float, num_neighbors: int,
                 reference: str = "farthest") -> None:
        self.index, self.offset, self.scale = index, offset, scale
        self.num_neighbors, self.reference = num_neighbors, reference

    def of(self, hidden: torch.Tensor, found: Neighbors) -> torch.Tensor:
        ref = None
        if self.reference == "norm":
            nearest_sq = self.index.key_sq[found.rows[:, 0]]  # [T]
            ref = mixture.norm_reference(hidden.to(nearest_sq.device), nearest_sq)
        return mixture.retrieval_confidence(found.dist2, self.offset, self.scale, ref)

    def quick(self, d2: torch.Tensor) -> torch.Tensor | None:
        """d²_nearest is the minimum of ``d2`` and d²_farthest (of the r nearest) its r-th
        smallest: the very numbers the sorted top-r would hold first and last."""
        if self.reference != "farthest":
            return None  # the norm reference needs the nearest row itself
        k = min(self.num_neighbors, self.index.num_active)
        ends = torch.stack([d2.min(dim=-1).values, d2.kthvalue(k, dim=-1).values], 1)  # [T, 2]
        return mixture.retrieval_confidence(ends, self.offset, self.scale)


# --- judges -----------------------------------------------------------------------------------
class Judge(Protocol):
    def beliefs(self, logits: torch.Tensor, hidden: torch.Tensor) -> list[Belief]:
        """The belief at each fed position: ``logits`` ``(T, V)``, ``hidden`` ``(T, D)``."""
        ...

    def rescore(self, belief: Belief) -> Belief:
        """The belief again, after copied keys were masked (they are not retrieved twice)."""
        ...

    def verify(self, beliefs: Sequence[Belief], tokens: Sequence[int], exact: bool) -> int:
        """How many leading ``tokens`` pass: relaxed verification (Eq. 7, prefix rule), or
        with ``exact`` (lookup drafts) those equal to the token decoding picks anyway."""
        ...


class _Verifier:
    """Eq. 7 with the prefix rule, shared by the judges; :meth:`odds` says on what."""

    def __init__(self, relaxation: float, stats: DecodeStats) -> None:
        self.relaxation, self.stats = relaxation, stats

    def odds(self, beliefs: Sequence[Belief], tokens: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p(w), max p)`` ``(n,)`` each, at each drafted position."""
        raise NotImplementedError

    def verify(self, beliefs: Sequence[Belief], tokens: Sequence[int], exact: bool) -> int:
        if not tokens:
            return 0
        t0 = time.perf_counter()
        if exact:  # words found by lookup are no evidence: only the decoder's own choice
            ok = torch.tensor([t == b.top_token for b, t in zip(beliefs, tokens, strict=True)])
        else:
            ok = mixture.relaxed_accept(*self.odds(beliefs, tokens), self.relaxation)
            # end_with_lm: no draft token is kept where the LM would end the answer
            ok &= torch.tensor([not b.lm_ends for b in beliefs])
        self.stats.knn_seconds += time.perf_counter() - t0
        return mixture.accepted_prefix(ok)


class MixtureJudge(_Verifier):
    """The paper's judge: p_M at every fed position (sparse, :func:`mixture.sparse_mixture`).

    ``end_with_lm`` (beyond the paper): where the LM alone would end the answer, the
    belief's choice is the LM's end token."""

    def __init__(self, index: TokenIndex | None, confidence: Confidence, *, temperature: float,
                 num_neighbors: int, relaxation: float, eos: frozenset[int],
                 end_with_lm: bool, stats: DecodeStats) -> None:
        super().__init__(relaxation, stats)
        self.index, self.confidence = index, confidence
        self.temperature, self.num_neighbors = temperature, num_neighbors
        self.eos, self.end_with_lm = eos, end_with_lm

    def beliefs(self, logits: torch.Tensor, hidden: torch.Tensor) -> list[Belief]:
        t0 = time.perf_counter()
        scaled = logits / self.temperature  # [T, V]
        found = (self.index.search(hidden, self.num_neighbors)
                 if self.index is not None else None)
        weights = values = None
        lam = torch.ones(logits.shape[0])  # base mode, no passages, or all keys masked
        lm_max, lm_top = mixture.row_max(scaled)  # [T], [T]
        ends = [self.end_with_lm and t in self.eos for t in lm_top]
        if found is not None:
            assert self.index is not None
            weights = mixture.knn_weights(found.dist2, self.index.dim)  # [T, k]
            values = self.index.values[found.rows]  # [T, k]
            lam = self.confidence.of(hidden, found)
        candidates, p_m, lse = mixture.sparse_mixture(scaled, lam, weights, values)
        best = p_m.max(dim=-1)  # over candidates: the max of p_M over the vocabulary
        tops, top_probs = candidates[best.indices].tolist(), best.values.tolist()
        tops = [lm_top[i] if ends[i] else t for i, t in enumerate(tops)]
        out = [Belief(top_token=tops[i], top_prob=top_probs[i], lam=float(lam[i]),
                      neighbors=None if found is None else
                      Neighbors(found.dist2[i:i + 1], found.rows[i:i + 1]),
                      scaled_logits=scaled[i], lse=lse[i],
                      weights=None if weights is None else weights[i],
                      values=None if values is None else values[i],
                      logits=logits[i], hidden=hidden[i], lm_ends=ends[i],
                      lm_max=lm_max[i], temperature=self.temperature)
               for i in range(logits.shape[0])]
        self.stats.knn_seconds += time.perf_counter() - t0
        return out

    def rescore(self, belief: Belief) -> Belief:
        return self.beliefs(belief.logits[None], belief.hidden[None])[0]

    def odds(self, beliefs: Sequence[Belief], tokens: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        p_tok = torch.stack([b.probability(t) for b, t in zip(beliefs, tokens, strict=True)])
        return p_tok, torch.tensor([b.top_prob for b in beliefs])  # [n], [n]


class LMJudge(_Verifier):
    """p_LM judges (``verify_against="lm"``), every fed position searched: the exact
    reference of :class:`LazyLMJudge`.

    A single token is the LM's own choice and p_M is never consulted (no ``(T, V)``
    logsumexp); the kNN side only proposes drafts, which start with the LM's choice and
    need λ < δ (Eq. 6)."""

    quick = False  # λ from two order statistics first (LazyLMJudge)

    def __init__(self, index: TokenIndex | None, confidence: Confidence, *, temperature: float,
                 num_neighbors: int, span_threshold: float, relaxation: float,
                 eos: frozenset[int], end_with_lm: bool, starters: frozenset[int],
                 stats: DecodeStats) -> None:
        super().__init__(relaxation, stats)
        self.index, self.confidence = index, confidence
        self.temperature, self.num_neighbors = temperature, num_neighbors
        self.span_threshold, self.eos, self.end_with_lm = span_threshold, eos, end_with_lm
        self.starters = starters  # the tokens a span may start with

    def beliefs(self, logits: torch.Tensor, hidden: torch.Tensor) -> list[Belief]:
        return self.judged(logits, hidden, search=True)

    def rescore(self, belief: Belief) -> Belief:
        return self.judged(belief.logits[None], belief.hidden[None], search=True)[0]

    def odds(self, beliefs: Sequence[Belief], tokens: Sequence[int]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        p_tok = torch.tensor([b.lm_ratio(t) for b, t in zip(beliefs, tokens, strict=True)])
        return p_tok, torch.ones_like(p_tok)  # [n]: p_LM(w) / max p_LM against 1

    def top_tokens(self, logits: torch.Tensor
                   ) -> tuple[list[int], list[float] | None, torch.Tensor | None]:
        """argmax p_LM per row, and the rows' max scaled logit or the scaled rows."""
        scaled = logits / self.temperature  # [T, V]
        return scaled.max(dim=-1).indices.tolist(), None, scaled

    def may_start(self, tops: list[int]) -> bool:
        """Whether a search could let a span start at some position (always: reference)."""
        return True

    def judged(self, logits: torch.Tensor, hidden: torch.Tensor, search: bool
               ) -> list[Belief]:
        t0 = time.perf_counter()
        n = logits.shape[0]
        tops, lm_max, scaled = self.top_tokens(logits)
        ends = [self.end_with_lm and t in self.eos for t in tops]
        lams, found = [1.0] * n, None
        index = self.index
        if search and index is not None and self.may_start(tops) and index.num_active:
            d2 = index.distances(hidden)  # [T, N]
            lam = self.confidence.quick(d2) if self.quick else None
            # the sorted top-k (the costly part) only where λ lets a span start
            if lam is None or bool((lam < self.span_threshold).any()):
                found = index.nearest(d2, self.num_neighbors)
                assert found is not None
                lam = self.confidence.of(hidden, found)
            lams = lam.tolist()
        weights = values = None
        if found is not None and index is not None:
            weights = mixture.knn_weights(found.dist2, index.dim)  # [T, k]
            values = index.values[found.rows]  # [T, k]
        rows, states = logits.unbind(0), hidden.unbind(0)  # T views each, in one call
        out = [Belief(top_token=tops[i], top_prob=math.nan, lam=lams[i],
                      neighbors=None if found is None else
                      Neighbors(found.dist2[i:i + 1], found.rows[i:i + 1]),
                      scaled_logits=None if scaled is None else scaled[i], lse=None,
                      weights=None if weights is None else weights[i],
                      values=None if values is None else values[i],
                      logits=rows[i], hidden=states[i], lm_ends=ends[i],
                      lm_max=None if lm_max is None else lm_max[i],
                      temperature=self.temperature)
               for i in range(n)]
        self.stats.knn_seconds += time.perf_counter() - t0
        return out


class LazyLMJudge(LMJudge):
    """:class:`LMJudge` with lossless shortcuts; the same beliefs' choices, λ and drafts.

    * a draft's positions are judged by p_LM alone and the next step starts from a
      rescored belief, so only a single fed position (the prompt's last, a single token)
      is searched;
    * no search where no row may start a span with the LM's choice (λ is left at 1);
    * λ first from two order statistics of the distances, the sorted top-k only where λ
      lets a span start;
    * max and argmax of ``logits / T`` without dividing the ``(T, V)`` rows.
    """

    quick = True

    def beliefs(self, logits: torch.Tensor, hidden: torch.Tensor) -> list[Belief]:
        return self.judged(logits, hidden, search=logits.shape[0] == 1)

    def top_tokens(self, logits: torch.Tensor
                   ) -> tuple[list[int], list[float] | None, torch.Tensor | None]:
        lm_max, tops = mixture.scaled_row_max(logits, self.temperature)  # [T], [T]
        return tops, lm_max, None

    def may_start(self, tops: list[int]) -> bool:
        return not self.starters.isdisjoint(tops)
