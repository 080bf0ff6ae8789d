"""The formulas of the paper, on tensors: kNN distribution, RRC, mixture, relaxed acceptance."""

from __future__ import annotations

import math

import torch


def knn_weights(dist2: torch.Tensor, dim: int) -> torch.Tensor:
    """Neighbour weights w_i = softmax_i(-d_i² / sqrt(D)) (μ = 1/sqrt(D), as in attention)."""
    return torch.softmax(-dist2.float() / math.sqrt(dim), dim=-1)  # [Q, k]


def scatter_to_vocab(weights: torch.Tensor, values: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sum neighbour weights onto their next tokens: ``(Q, k)`` -> ``(Q, V)``."""
    out = torch.zeros(weights.shape[0], vocab_size, dtype=torch.float32, device=weights.device)
    return out.scatter_add_(1, values, weights)


def retrieval_confidence(dist2: torch.Tensor, offset: float, scale: float) -> torch.Tensor:
    """Relative Retrieval Confidence λ (Eq. 4): the weight on **p_LM**.

    ρ = d²_nearest / d²_farthest over the retrieved (finite) neighbours, sorted ascending;
    λ = sigmoid((ρ - α) / τ). A nearest neighbour much closer than the rest (small ρ) means
    confident retrieval, small λ, trust kNN. With a single neighbour, or all distances zero,
    there is nothing to compare: ρ = 1 (trust the LM).
    """
    nearest, farthest = dist2[:, 0], dist2[:, -1]  # [Q], [Q]
    ratio = torch.where(farthest > 0, nearest / farthest.clamp_min(1e-30),
                        torch.ones_like(farthest))
    return torch.sigmoid((ratio - offset) / scale)  # [Q]


def mix(p_lm: torch.Tensor, p_knn: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """p_M = λ·p_LM + (1-λ)·p_kNN, row-wise: ``(Q, V)``, ``(Q, V)``, ``(Q,)`` -> ``(Q, V)``."""
    lam = lam[:, None]
    return lam * p_lm + (1.0 - lam) * p_knn


def accept_probability(p_m: torch.Tensor, tokens: torch.Tensor, relaxation: float) -> torch.Tensor:
    """Eq. 7: P_accept(w) = min(1, p_M(w) / (γ · max_w' p_M(w'))), per row -> ``(Q,)``."""
    p_tok = p_m.gather(1, tokens[:, None])[:, 0]  # [Q]
    p_max = p_m.max(dim=-1).values  # [Q]
    return torch.clamp(p_tok / (relaxation * p_max), max=1.0)


def relaxed_accept(p_m: torch.Tensor, tokens: torch.Tensor, relaxation: float) -> torch.Tensor:
    """Greedy (deterministic) relaxed verification, as in Algorithm 1: accept a draft token
    when its acceptance probability exceeds one half. ``(Q, V)``, ``(Q,)`` -> bool ``(Q,)``."""
    return accept_probability(p_m, tokens, relaxation) > 0.5


def accepted_prefix(accepted: torch.Tensor) -> int:
    """Length of the leading run of ``True`` in a 1-D bool tensor (prefix acceptance)."""
    rejected = (~accepted).nonzero()
    return int(rejected[0, 0]) if rejected.numel() else int(accepted.numel())


def knn_distribution(dist2: torch.Tensor, values: torch.Tensor, vocab_size: int,
                     dim: int) -> torch.Tensor:
    """p_kNN (Eq. 2) from sorted neighbour distances ``(Q, k)`` and their tokens ``(Q, k)``."""
    return scatter_to_vocab(knn_weights(dist2, dim), values, vocab_size)
