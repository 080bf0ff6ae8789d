"""The paper's formulas against hand-computed values."""

import math

import pytest
import torch

from nest_core.decoding import mixture


def test_knn_weights_use_inverse_sqrt_dim_temperature():
    w = mixture.knn_weights(torch.tensor([[1.0, 4.0]]), dim=4)
    a, b = math.exp(-0.5), math.exp(-2.0)  # -d2 / sqrt(4)
    assert w.tolist()[0] == pytest.approx([a / (a + b), b / (a + b)], rel=1e-6)


def test_knn_distribution_sums_weights_of_neighbours_with_the_same_token():
    weights = mixture.knn_weights(torch.tensor([[0.0, 0.0, 2.0]]), dim=1)
    p = mixture.scatter_to_vocab(weights, torch.tensor([[3, 3, 1]]), vocab_size=5)
    a, c = 1.0, math.exp(-2.0)
    expected = [0.0, c / (2 * a + c), 0.0, 2 * a / (2 * a + c), 0.0]
    assert p.tolist()[0] == pytest.approx(expected, rel=1e-6)
    assert float(p.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(("nearest", "farthest", "expected_rho"),
                         [(1.0, 10.0, 0.1), (3.0, 10.0, 0.3), (0.0, 5.0, 0.0), (2.0, 2.0, 1.0)])
def test_retrieval_confidence_is_sigmoid_of_distance_ratio(nearest, farthest, expected_rho):
    lam = mixture.retrieval_confidence(torch.tensor([[nearest, 1.5, farthest]]), 0.3, 0.1)
    assert float(lam[0]) == pytest.approx(1 / (1 + math.exp(-(expected_rho - 0.3) / 0.1)),
                                          rel=1e-6)


def test_retrieval_confidence_paper_table_values():
    # PAPER.md 2.4: with α=0.3, τ=0.1: ρ=0 -> 0.047, ρ=0.3 -> 0.5, ρ=0.5 -> 0.88
    d2 = torch.tensor([[0.0, 1.0], [0.3, 1.0], [0.5, 1.0]])
    lam = mixture.retrieval_confidence(d2, 0.3, 0.1)
    assert lam.tolist() == pytest.approx([0.0474, 0.5, 0.8808], abs=1e-4)


def test_degenerate_neighbourhoods_trust_the_lm():
    # one neighbour, or all distances zero: no relative confidence, ρ = 1
    lam = mixture.retrieval_confidence(torch.tensor([[4.0], [0.0]]), 0.3, 0.1)
    assert lam.tolist() == pytest.approx([1 / (1 + math.exp(-7.0))] * 2, rel=1e-6)


def test_mixture_weights_lm_by_lambda():
    p_lm = torch.tensor([[0.8, 0.2, 0.0]])
    p_knn = torch.tensor([[0.0, 0.5, 0.5]])
    p = mixture.mix(p_lm, p_knn, torch.tensor([0.25]))
    assert p.tolist()[0] == pytest.approx([0.2, 0.425, 0.375])


def test_relaxed_acceptance_threshold_is_half_gamma_times_max():
    p_tok, p_max = torch.tensor([0.02]), torch.tensor([0.5])
    # P_accept = min(1, 0.02 / (γ 0.5)); accept when > 1/2
    assert float(mixture.accept_probability(p_tok, p_max, 0.05)[0]) == pytest.approx(0.8)
    assert bool(mixture.relaxed_accept(p_tok, p_max, 0.05)[0]) is True
    assert float(mixture.accept_probability(p_tok, p_max, 0.1)[0]) == pytest.approx(0.4)
    assert bool(mixture.relaxed_accept(p_tok, p_max, 0.1)[0]) is False
    # the argmax is always accepted for γ <= 1
    assert bool(mixture.relaxed_accept(p_max, p_max, 1.0)[0]) is True


@pytest.mark.parametrize("with_knn", [True, False])
def test_sparse_mixture_equals_the_dense_mixture(with_knn):
    torch.manual_seed(0)
    T, V, k = 5, 300, 40
    logits = torch.randn(T, V) * 3
    dist2 = torch.sort(torch.rand(T, k) * 10, dim=-1).values
    values = torch.randint(0, 60, (T, k))  # repeated tokens, as in a real datastore
    weights = mixture.knn_weights(dist2, dim=16) if with_knn else None
    lam = mixture.retrieval_confidence(dist2, 0.3, 0.1) if with_knn else torch.ones(T)
    p_lm = torch.softmax(logits / 0.7, dim=-1)
    dense = (mixture.mix(p_lm, mixture.scatter_to_vocab(weights, values, V), lam)
             if with_knn else p_lm)
    cands, p_sparse, lse = mixture.sparse_mixture(logits / 0.7, lam, weights,
                                                  values if with_knn else None)
    best = p_sparse.max(dim=-1)
    assert cands[best.indices].tolist() == dense.argmax(-1).tolist()
    torch.testing.assert_close(best.values, dense.max(-1).values)
    tokens = torch.randint(0, V, (T,))
    p_tok = mixture.token_probability(logits / 0.7, lse, lam, weights,
                                      values if with_knn else None, tokens)
    torch.testing.assert_close(p_tok, dense.gather(1, tokens[:, None])[:, 0])


def test_accepted_prefix_stops_at_first_rejection():
    assert mixture.accepted_prefix(torch.tensor([True, True, False, True])) == 2
    assert mixture.accepted_prefix(torch.tensor([True, True])) == 2
    assert mixture.accepted_prefix(torch.tensor([False, True])) == 0
    assert mixture.accepted_prefix(torch.tensor([], dtype=torch.bool)) == 0


def test_default_config_per_model_and_ra_nest_relaxation():
    from nest_core.config import (
        ANSWER_DEFAULTS,
        MODEL_DEFAULTS,
        RA_NEST_RELAXATION,
        NestConfig,
        default_config,
        paper_config,
    )

    assert paper_config("some/other-model") == NestConfig()  # the paper's defaults
    other = default_config("some/other-model")
    assert other == NestConfig(**ANSWER_DEFAULTS, continuation=NestConfig())
    assert default_config().continuation == paper_config()  # a continuation: the paper's way
    bundled, paper = default_config(), paper_config()
    for field, value in MODEL_DEFAULTS["SmolLM2-135M-Instruct"].items():
        assert getattr(paper, field) == value
        if field not in ANSWER_DEFAULTS:
            assert getattr(bundled, field) == value
    for field, value in ANSWER_DEFAULTS.items():
        assert getattr(bundled, field) == value
    assert NestConfig().verify_against == "mixture"  # nothing beyond the paper by default
    assert not NestConfig().end_with_lm
    assert bundled.relaxation == ANSWER_DEFAULTS["relaxation"]  # strict, on p_LM
    assert paper_config(passages_in_prompt=True).relaxation == RA_NEST_RELAXATION
    assert default_config(relaxation=0.01).relaxation == 0.01
    assert paper_config().relaxation == 0.2  # calibrated, copy-only Nest
