"""The weight-first kernel for few-row linear layers (:mod:`nest_core.small_batches`)."""

from __future__ import annotations

import copy

import pytest
import torch

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.lm import LanguageModel
from nest_core.small_batches import MAX_ROWS, WeightFirstLinear, use_weight_first


@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 2, 24), (3, 24), (2, 5, 24),
                                   (1, MAX_ROWS, 24), (1, MAX_ROWS + 1, 24), (0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_first_computes_the_linear_layer(shape, bias):
    # caught: the transpose left out, the bias dropped, the leading shape lost
    torch.manual_seed(0)
    stock = torch.nn.Linear(24, 40, bias=bias)
    fast = copy.deepcopy(stock)
    fast.__class__ = WeightFirstLinear
    x = torch.randn(*shape)
    want, got = stock(x), fast(x)
    assert got.shape == want.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weight_first_is_the_float32_product_only():
    # caught: bfloat16 sent through the weight-first product (slower there: oneDNN's bf16
    # kernels serve F.linear), or float32 few-row inputs not sent through it
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    layer.__class__ = WeightFirstLinear
    x = torch.randn(4, 24)
    weight_first = (layer.weight @ x.T).T + layer.bias
    assert torch.equal(layer(x), weight_first.contiguous())
    half = copy.deepcopy(layer).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(half(xb), torch.nn.functional.linear(xb, half.weight, half.bias))


def test_use_weight_first_changes_plain_linear_layers_only():
    class Adapter(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), Adapter(4, 4),
                                torch.nn.Sequential(torch.nn.Linear(4, 2)))
    assert use_weight_first(model) == 2
    assert [type(m).__name__ for m in model.modules()][1:] == [
        "WeightFirstLinear", "ReLU", "Adapter", "Sequential", "WeightFirstLinear"]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias",
                                        "3.0.weight", "3.0.bias"]


def test_the_decoder_answers_the_same_with_weight_first_layers(tiny_lm):
    # drafts (2-16 tokens) go through the weight-first product: same tokens, same forwards
    cfg = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                     initial_span_length=8)
    passages = [Passage(id="p", text="The Ghent office opened in 2019 and hosts 45 people.")]
    fast_model = copy.deepcopy(tiny_lm.model)
    assert use_weight_first(fast_model) > 0
    fast_lm = LanguageModel(fast_model, tiny_lm.tokenizer, name=tiny_lm.name)
    want = NestDecoder(tiny_lm, cfg).generate("Tell me about Ghent.", passages,
                                              max_new_tokens=24)
    got = NestDecoder(fast_lm, cfg).generate("Tell me about Ghent.", passages,
                                             max_new_tokens=24)
    assert want.stats.drafted_tokens > 0
    assert got.token_ids == want.token_ids
    assert got.stats.lm_forwards == want.stats.lm_forwards
