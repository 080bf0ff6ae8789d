"""The weight-first kernel for few-row linear layers, and the paired-row one that keeps a lone
bfloat16 row's rounding that of a packed product (:mod:`nest_core.small_batches`)."""

from __future__ import annotations

import copy

import pytest
import torch

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.lm import LanguageModel
from nest_core.small_batches import (
    MAX_ROWS,
    PairedRowLinear,
    WeightFirstLinear,
    use_paired_rows,
    use_weight_first,
)


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


@pytest.mark.parametrize("shape", [(1536,), (1, 1, 1536), (1, 1536)])
def test_a_lone_bfloat16_row_rounds_as_it_does_among_others(shape):
    # SmolLM2's down projection shape (1536 -> 576): on an AVX512-BF16 CPU oneDNN's one-row
    # product rounds some rows differently from the same row in a product of several (here
    # rows 1, 11, 20, 28 and 51 of 64); the paired row is what makes a lone decoding step equal its
    # packed one. Caught: the pairing dropped, the wrong row kept
    torch.manual_seed(0)
    layer = torch.nn.Linear(1536, 576, dtype=torch.bfloat16)
    x = torch.randn(64, 1536).to(torch.bfloat16)
    among_others = torch.nn.functional.linear(x, layer.weight, layer.bias)  # [64, 576]
    layer.__class__ = PairedRowLinear
    for i in range(64):
        got = layer(x[i].reshape(shape))
        assert got.shape == (*shape[:-1], 576)
        assert torch.equal(got.reshape(576), among_others[i]), f"row {i}"
    assert torch.equal(layer(x), among_others)  # several rows: the stock product
    x32 = x[:1].float()
    assert torch.equal(layer.float()(x32), torch.nn.functional.linear(
        x32, layer.weight, layer.bias))  # float32: the stock product


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
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), Adapter(4, 4))
    assert use_paired_rows(other) == 1
    assert [type(m).__name__ for m in other.modules()][1:] == ["PairedRowLinear", "Adapter"]


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
