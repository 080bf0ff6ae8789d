"""What the decoder believes about the next token at one position: :class:`Belief`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nest_core.decoding import mixture
from nest_core.token_index import Neighbors


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
    (used with ``end_with_lm``); ``lm_max``: the largest scaled logit. When the LM judges
    (:class:`~nest_core.decoding.judges.LMJudge`) p_M is never consulted: ``top_prob`` is
    NaN and ``lse`` is ``None`` (drafts are judged by :meth:`lm_ratio`, in which the
    normaliser cancels).
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
