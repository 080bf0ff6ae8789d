"""The decoder's shortcuts and the prefix cache on the real SmolLM2: same token ids."""

from __future__ import annotations

import pytest

from nest_core import NestDecoder, Passage
from nest_core.config import default_config
from nest_core.decoding.policy import FAST, REFERENCE, Shortcuts
from nest_core.lm import LanguageModel

pytestmark = pytest.mark.integration

PASSAGES = [
    Passage("ro", "Romania: alpha-2 code RO, alpha-3 code ROU, numeric code 642.\n"
            "Rwanda: alpha-2 code RW, alpha-3 code RWA, numeric code 646.", title="Countries R"),
    Passage("zw", "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in "
            "Ostrava. It makes brass widgets for clockmakers and employs 340 people.",
            title="Zephyr Widget Company"),
    Passage("brass", "Brass is an alloy of copper and zinc. Clockmakers use brass gears "
            "because brass is easy to machine and resists corrosion.", title="Brass"),
]
QUESTIONS = [
    "What is the ISO 3166-1 numeric code of Romania? Answer in a few words.",
    "Who founded the Zephyr Widget Company, and in which year?",
    "What is the ISO 3166-1 alpha-3 code of Rwanda? Answer in a few words.",
]


def _answers(lm: LanguageModel, shortcuts: Shortcuts) -> list[list[int]]:
    """Each question answered by the decoder's own stream, taking ``shortcuts``."""
    dec = NestDecoder(lm, default_config(lm.name), shortcuts=shortcuts)
    return [dec.generate(q, PASSAGES, max_new_tokens=32).token_ids for q in QUESTIONS]


def test_shortcuts_and_prefix_cache_keep_the_token_ids(smollm):
    # caught (as in the unit tests): a wrong λ shortcut, a wrong span-starter set, a
    # prefix reused one token too far
    cold = LanguageModel(smollm.model, smollm.tokenizer, name=smollm.name,
                         prefix_cache_bytes=0)
    warm = LanguageModel(smollm.model, smollm.tokenizer, name=smollm.name)
    slow = _answers(cold, REFERENCE)  # the slow path, every draft token also waiting
    fast = _answers(warm, FAST)
    assert fast == slow
    assert all(slow), "the answers must not be empty"
    again = NestDecoder(warm, default_config(warm.name)).generate(QUESTIONS[0], PASSAGES,
                                                                  max_new_tokens=32)
    assert again.token_ids == slow[0]
    assert again.stats.prefix_cache_hits == 1
    assert again.stats.prefix_reused_tokens == again.stats.prompt_tokens - 1


def test_load_model_takes_the_prefix_cache_bound(smollm):
    from nest_core.models import load_model

    off = load_model(shared=False, prefix_cache_bytes=0)
    assert off.prefix_cache.max_bytes == 0
    dec = NestDecoder(off, default_config(off.name))
    dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=4)
    again = dec.generate(QUESTIONS[0], PASSAGES, max_new_tokens=4)
    assert again.stats.prefix_cache_hits == 0
    assert smollm.prefix_cache.max_bytes > 0  # the default, for the shared model


def test_smollm_loads_with_weight_first_layers_and_answers_the_same(smollm):
    # caught: load_model's default leaving the stock layers on CPU float32
    from nest_core.models import load_model
    from nest_core.small_batches import WeightFirstLinear

    assert any(isinstance(m, WeightFirstLinear) for m in smollm.model.modules())
    stock = load_model(shared=False, weight_first=False, prefix_cache_bytes=0)
    assert not any(isinstance(m, WeightFirstLinear) for m in stock.model.modules())
    for question in QUESTIONS:
        fast = NestDecoder(smollm, default_config(smollm.name)).generate(
            question, PASSAGES, max_new_tokens=32)
        want = NestDecoder(stock, default_config(stock.name)).generate(
            question, PASSAGES, max_new_tokens=32)
        assert fast.stats.drafted_tokens > 0
        assert fast.token_ids == want.token_ids
