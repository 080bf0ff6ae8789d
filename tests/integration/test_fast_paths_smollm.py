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


def test_bfloat16_steps_and_answers_packed_with_others_equal_their_solo_ones():
    """``nest serve --batching --dtype bfloat16``'s promise on the real SmolLM2: a request's
    forward packed with others' (1, 2, 4 or 8 new tokens, or a prompt read) gives the
    logits of the same forward alone, bit for bit, and answers decoded together are the
    answers decoded alone. Caught: a forward alone run unpacked (bfloat16 attention, not the
    packed path's float32), a lone one-token step on oneDNN's one-row kernel (layer 10's
    down projection rounds otherwise), a request's keys padded to the longest's."""
    import random

    import torch

    from nest_core.batching import batcher_for, forward_packed
    from nest_core.models import load_model

    lm = load_model(dtype="bfloat16", shared=False, prefix_cache_bytes=0)
    batcher = batcher_for(lm)  # what a batching server does once, before any answer
    rng = random.Random(0)
    words = " ".join(p.text for p in PASSAGES).split()
    key_layer = default_config(lm.name).key_layer

    def text_ids(n: int) -> list[int]:
        start = rng.randrange(len(words) - 10)
        return lm.tokenizer(" ".join((words * 4)[start:start + n]))["input_ids"]

    for _ in range(6):
        prompts = [text_ids(rng.randint(20, 90)) for _ in range(rng.randint(2, 4))]
        steps = [text_ids(12)[:rng.choice([1, 1, 2, 4, 8, 12])] for _ in prompts]
        reads = [len(s) == 12 for s in steps]  # a new prompt: its last position only
        caches, alone = [], []
        for ids, step, read in zip(prompts, steps, reads, strict=True):
            cache, solo = lm.new_cache(), lm.new_cache()
            lm.forward(ids, cache, key_layer, last_only=True)
            lm.forward(ids, solo, key_layer, last_only=True)
            caches.append(cache)
            alone.append(batcher.forward(step, solo, key_layer, last_only=read))
        packed = forward_packed(lm, list(zip(steps, caches, strict=True)), key_layer, reads)
        for got, want in zip(packed, alone, strict=True):
            assert torch.equal(got.logits, want.logits)
    dec = NestDecoder(lm, default_config(lm.name))
    solo = [dec.generate(q, PASSAGES, max_new_tokens=32).token_ids for q in QUESTIONS]
    together = dec.generate_many(QUESTIONS, [PASSAGES] * 3, max_new_tokens=32)
    assert [r.token_ids for r in together] == solo
