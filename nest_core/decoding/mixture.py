"""The formulas of the paper, on tensors: kNN distribution, RRC, mixture, relaxed acceptance."""

from __future__ import annotations

import math

import numpy as np
import torch


def knn_weights(dist2: torch.Tensor, dim: int) -> torch.Tensor:
    """Neighbour weights w_i = softmax_i(-d_i² / sqrt(D)) (μ = 1/sqrt(D), as in attention)."""
    return torch.softmax(-dist2.float() / math.sqrt(dim), dim=-1)  # [Q, k]


def scatter_to_vocab(weights: torch.Tensor, values: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sum neighbour weights onto their next tokens: ``(Q, k)`` -> ``(Q, V)``."""
    out = torch.zeros(weights.shape[0], vocab_size, dtype=torch.float32, device=weights.device)
    return out.scatter_add_(1, values, weights)


def retrieval_confidence(dist2: torch.Tensor, offset: float, scale: float,
                         reference: torch.Tensor | None = None) -> torch.Tensor:
    """Relative Retrieval Confidence λ (Eq. 4): the weight on **p_LM**.

    ρ = d²_nearest / d²_farthest over the retrieved (finite) neighbours, sorted ascending;
    λ = sigmoid((ρ - α) / τ). A nearest neighbour much closer than the rest (small ρ) means
    confident retrieval, small λ, trust kNN. With a single neighbour, or all distances zero,
    there is nothing to compare: ρ = 1 (trust the LM).

    ``reference`` ``(Q,)`` replaces d²_farthest (see :func:`norm_reference`): the farthest of
    r neighbours depends on how many rows the datastore has (r is clamped to them), so the
    same query looks more confident against 2 passages than against 40.
    """
    nearest = dist2[:, 0]  # [Q]
    farthest = dist2[:, -1] if reference is None else reference  # [Q]
    ratio = torch.where(farthest > 0, nearest / farthest.clamp_min(1e-30),
                        torch.ones_like(farthest))
    return torch.sigmoid((ratio - offset) / scale)  # [Q]


def norm_reference(queries: torch.Tensor, nearest_key_sq: torch.Tensor) -> torch.Tensor:
    """||q||² + ||k_1||²: the squared distance of q to its nearest key k_1 were the two
    orthogonal. ρ = d²_1 / (||q||² + ||k_1||²) = 1 - 2q·k_1 / (||q||² + ||k_1||²) lies in
    [0, 2], is 0 for an identical context and depends on no other row of the datastore:
    λ means the same for 2 passages and for 40. ``queries`` ``(Q, D)`` -> ``(Q,)``."""
    return (queries.float() * queries.float()).sum(-1) + nearest_key_sq


def mix(p_lm: torch.Tensor, p_knn: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """p_M = λ·p_LM + (1-λ)·p_kNN, row-wise: ``(Q, V)``, ``(Q, V)``, ``(Q,)`` -> ``(Q, V)``."""
    lam = lam[:, None]
    return lam * p_lm + (1.0 - lam) * p_knn


def accept_probability(p_token: torch.Tensor, p_max: torch.Tensor,
                       relaxation: float) -> torch.Tensor:
    """Eq. 7: P_accept(w) = min(1, p_M(w) / (γ · max_w' p_M(w'))), element-wise."""
    return torch.clamp(p_token / (relaxation * p_max), max=1.0)


def relaxed_accept(p_token: torch.Tensor, p_max: torch.Tensor,
                   relaxation: float) -> torch.Tensor:
    """Greedy (deterministic) relaxed verification, as in Algorithm 1: accept a draft token
    when its acceptance probability exceeds one half."""
    return accept_probability(p_token, p_max, relaxation) > 0.5


def accepted_prefix(accepted: torch.Tensor) -> int:
    """Length of the leading run of ``True`` in a 1-D bool tensor (prefix acceptance)."""
    rejected = (~accepted).nonzero()
    return int(rejected[0, 0]) if rejected.numel() else int(accepted.numel())


def sparse_mixture(scaled_logits: torch.Tensor, lam: torch.Tensor,
                   weights: torch.Tensor | None, values: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p_M on the only tokens that can be its maximum, without a dense ``(T, V)`` mixture.

    Off the kNN support p_M = λ·p_LM, whose largest value is at argmax p_LM; so the max of
    p_M over the vocabulary lies in C = (values of the neighbours) ∪ (argmax p_LM). On CPU
    this is ~8x cheaper than materialising p_kNN and p_M for a 64-token draft.

    ``scaled_logits``: ``(T, V)`` logits / LM temperature; ``lam``: ``(T,)``;
    ``weights``/``values``: ``(T, k)`` neighbour weights and tokens, or ``None``.
    Returns ``candidates`` ``(C,)``, ``p_m`` ``(T, C)`` on them, and ``lse`` ``(T,)`` (the
    log normaliser of p_LM).
    """
    lse = torch.logsumexp(scaled_logits, dim=-1)  # [T]
    lm_top = scaled_logits.argmax(dim=-1)  # [T]
    if weights is None or values is None:
        candidates, inverse = torch.unique(lm_top, return_inverse=True)  # [C], [T]
        p_knn = torch.zeros(lm_top.shape[0], candidates.shape[0])
    else:
        pool = torch.cat([values, lm_top[:, None]], dim=1)  # [T, k+1]
        candidates, inverse = torch.unique(pool, return_inverse=True)  # [C], [T, k+1]
        p_knn = torch.zeros(pool.shape[0], candidates.shape[0])  # [T, C]
        p_knn.scatter_add_(1, inverse[:, :-1], weights.float())
    p_lm = torch.exp(scaled_logits[:, candidates] - lse[:, None])  # [T, C]
    return candidates, mix(p_lm, p_knn, lam), lse


def token_probability(scaled_logits: torch.Tensor, lse: torch.Tensor, lam: torch.Tensor,
                      weights: torch.Tensor | None, values: torch.Tensor | None,
                      tokens: torch.Tensor) -> torch.Tensor:
    """p_M(tokens[i]) at each of T positions, sparse: ``(T,)`` tokens -> ``(T,)`` probs."""
    p_lm = torch.exp(scaled_logits.gather(1, tokens[:, None])[:, 0] - lse)  # [T]
    if weights is None or values is None:
        return p_lm
    p_knn = (weights.float() * (values == tokens[:, None])).sum(-1)  # [T]
    return lam * p_lm + (1.0 - lam) * p_knn


def row_max(x: torch.Tensor) -> tuple[list[float], list[int]]:
    """The max and its first index in each row of ``x`` ``(T, V)``: ``x.max(dim=-1)`` as
    lists. On CPU through numpy, whose argmax over a 49k vocabulary is ~6x faster than
    torch's max-with-indices kernel (ties and NaN: the first one, as in torch)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        best = x.max(dim=-1)
        return best.values.tolist(), best.indices.tolist()
    a = x.numpy()  # [T, V], no copy
    top = a.argmax(axis=-1)  # [T]
    return a[np.arange(a.shape[0]), top].tolist(), top.tolist()


def scaled_row_max(x: torch.Tensor, temperature: float) -> tuple[list[float], list[int]]:
    """``row_max(x / temperature)`` for ``x`` ``(T, V)`` without dividing the rows.

    Correctly rounded division by a positive number is monotone, so the largest scaled
    entry is the scaled largest entry, and the first argmax is the raw one unless rounding
    gives smaller logits the max's scaled value: those down to the lowest float that
    scales to it, a few floats below the max at most (a quotient's preimage is about one
    float of the max wide, whatever the temperature). Where the float just below the max
    scales to the max's value (not rare: 1/0.7 maps adjacent floats onto a grid twice as
    coarse past a power of two), the argmax is the first entry at or above that lowest
    float (:func:`_first_tied`). Torch divides a tensor by a Python number in the tensor's
    dtype, correctly rounded, as numpy does here. Exactly ``row_max(x / temperature)``,
    ties and NaN included; non-CPU and non-float rows are divided whole.
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return row_max(x / temperature)
    a = x.numpy()  # [T, V], no copy
    top = a.argmax(axis=-1)  # [T]
    peak = a[np.arange(a.shape[0]), top]  # [T]
    t = a.dtype.type(temperature)
    with np.errstate(over="ignore"):  # an infinite quotient is inf, as in torch
        scaled = peak / t  # [T]
        tied = np.nextafter(peak, -np.inf) / t == scaled  # [T]
    if tied.any():
        for i in np.flatnonzero(tied):
            top[i] = _first_tied(x[i], int(top[i]), temperature)
    return scaled.tolist(), top.tolist()


def _first_tied(row: torch.Tensor, top: int, temperature: float, steps: int = 8) -> int:
    """The first index of ``row``'s largest quotient by ``temperature``, where ``top`` is the
    first index of its max and floats below the max share its quotient: the first entry
    at or above the lowest of them (before ``top``, or ``top``). The row is divided
    whole when that lowest float lies more than ``steps`` floats below the max."""
    a = row.numpy()  # [V]
    t = a.dtype.type(temperature)
    with np.errstate(over="ignore", under="ignore"):
        target = a[top] / t
        low = a[top]
        for _ in range(steps):
            below = np.nextafter(low, -np.inf)
            if below / t != target:
                hits = np.flatnonzero(a[:top] >= low)
                return int(hits[0]) if hits.size else top
            low = below
    return int((row / temperature).numpy().argmax())
