"""The prefix KV cache across calls: same token ids as without it, bounded, thread-safe."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import PASSAGES, PROMPT

from nest_core import NestConfig, NestDecoder
from nest_core.config import default_config
from nest_core.lm import LanguageModel
from nest_core.prefix_cache import PrefixCache

pytestmark = pytest.mark.usefixtures("one_thread")

TURN = [{"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "The Zephyr Widget Company was founded in 1987."},
        {"role": "user", "content": "By whom, and where?"}]
PROMPTS: list[str | list[dict[str, str]]] = [
    PROMPT, "Tell me about nearest neighbor decoding.", PROMPT, TURN[:1], TURN,
    "The quick brown fox jumps"]
CONFIGS = [default_config("tiny"), NestConfig(confidence_offset=1.0, relaxation=1e-6,
                                              span_length=8, initial_span_length=2),
           NestConfig(mode="base")]




class FedLM(LanguageModel):
    """The real tiny LM, recording the ids of each forward."""

    def __init__(self, lm: LanguageModel, prefix_cache_bytes: int) -> None:
        super().__init__(lm.model, lm.tokenizer, name=lm.name,
                         prefix_cache_bytes=prefix_cache_bytes)
        self.calls: list[list[int]] = []

    def forward(self, input_ids, cache, key_layer, last_only=False):
        self.calls.append(list(input_ids))
        return super().forward(input_ids, cache, key_layer, last_only=last_only)


def answers(lm: LanguageModel, config: NestConfig) -> list[list[int]]:
    dec = NestDecoder(lm, config)
    return [dec.generate(p, PASSAGES, max_new_tokens=24).token_ids for p in PROMPTS]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "copy", "base"])
def test_same_token_ids_with_and_without_the_prefix_cache(tiny_lm, config):
    # caught: a prefix one token too long (the KV of a token the prompt does not have),
    # the whole prompt reused (nothing left to feed), the cache seeded without a copy
    cold = FedLM(tiny_lm, prefix_cache_bytes=0)
    warm = FedLM(tiny_lm, prefix_cache_bytes=2**30)
    assert answers(warm, config) == answers(cold, config)
    assert len(warm.prefix_cache) >= 1
    assert sum(map(len, warm.calls)) < sum(map(len, cold.calls)), "nothing was reused"


def test_a_hit_feeds_only_the_rest_of_the_prompt_and_counts_it(tiny_lm):
    # caught: stats not counted; the prompt fed whole after a hit
    lm = FedLM(tiny_lm, prefix_cache_bytes=2**30)
    dec = NestDecoder(lm, NestConfig(mode="base"))
    first = dec.generate(TURN[:1], max_new_tokens=3)
    assert (first.stats.prefix_cache_hits, first.stats.prefix_cache_misses) == (0, 1)
    assert first.stats.prefix_reused_tokens == 0
    lm.calls.clear()
    second = dec.generate(TURN, max_new_tokens=3)
    ids = lm.prompt_ids(TURN)
    head = lm.prompt_ids(TURN[:1])
    assert ids[:len(head)] == head  # an earlier turn is the head of the next prompt
    shared = len(head)
    assert (second.stats.prefix_cache_hits, second.stats.prefix_cache_misses) == (1, 0)
    assert second.stats.prefix_reused_tokens == shared
    assert lm.calls[0] == ids[shared:]
    # the same prompt again: all but its last token reused (its logits start the answer)
    lm.calls.clear()
    again = dec.generate(TURN, max_new_tokens=3)
    assert again.stats.prefix_reused_tokens == len(ids) - 1
    assert lm.calls[0] == ids[-1:]
    assert again.token_ids == second.token_ids


def test_the_cache_stays_within_its_bound(tiny_lm):
    # caught: no eviction; every entry evicted for one larger than the bound
    per_token = 2 * 3 * 2 * 8 * 4  # (keys, values) x 3 layers x 2 KV heads x head_dim 8 x fp32
    lm = LanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=60 * per_token)
    dec = NestDecoder(lm, NestConfig(mode="base"))
    for p in ["A compiler translates source code.", "The quick brown fox jumps over it.",
              "Chroma and FAISS store vectors."]:
        dec.generate(p, max_new_tokens=2)
        assert lm.prefix_cache.nbytes <= 60 * per_token
    assert 1 <= len(lm.prefix_cache) < 3
    kept = len(lm.prefix_cache)
    dec.generate(" ".join([PROMPT] * 4), max_new_tokens=2)  # over the bound alone
    assert len(lm.prefix_cache) == kept  # not kept, and nothing evicted for it
    small = LanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=per_token)
    NestDecoder(small, NestConfig(mode="base")).generate(PROMPT, max_new_tokens=2)
    assert len(small.prefix_cache) == 0
    off = LanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=0)
    for _ in range(2):
        res = NestDecoder(off, NestConfig(mode="base")).generate(PROMPT, max_new_tokens=2)
    assert res.stats.prefix_cache_misses == 1
    assert res.stats.prefix_reused_tokens == 0


def test_a_prompt_that_extends_an_entry_replaces_it(tiny_lm):
    # caught: both kept (the shorter one is the longer one's head), or the same prompt twice
    lm = LanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=2**30)
    dec = NestDecoder(lm, NestConfig(mode="base"))
    one, two = lm.prompt_ids(TURN[:1]), lm.prompt_ids(TURN)
    other = [{"role": "user", "content": PROMPT + " And where?"}]
    dec.generate(TURN[:1], max_new_tokens=2)
    dec.generate(TURN[:1], max_new_tokens=2)
    assert len(lm.prefix_cache) == 1
    dec.generate(other, max_new_tokens=2)  # shares the chat head only: both kept
    assert len(lm.prefix_cache) == 2
    dec.generate(TURN, max_new_tokens=2)
    assert two in lm.prefix_cache
    assert one not in lm.prefix_cache
    assert lm.prompt_ids(other) in lm.prefix_cache
    assert len(lm.prefix_cache) == 2


def test_concurrent_answers_equal_their_answers_alone(tiny_lm):
    # caught: a shared cache object between generations (one thread's tokens in another's)
    config = default_config("tiny")
    alone = answers(LanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=0),
                    config)
    lm = LanguageModel(tiny_lm.model, tiny_lm.tokenizer, prefix_cache_bytes=2**30)
    dec = NestDecoder(lm, config)
    dec.generate(PROMPT, PASSAGES, max_new_tokens=4)  # every thread starts from a hit
    got: dict[int, list[int]] = {}

    def answer(i: int) -> None:
        got[i] = dec.generate(PROMPTS[i], PASSAGES, max_new_tokens=24).token_ids

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(PROMPTS))] == alone


def test_entries_are_never_changed_by_the_generations_seeded_from_them(tiny_lm):
    # caught: seeding that hands out the stored tensors to be grown or cropped in place
    cache = PrefixCache(2**30)
    ids = tiny_lm.prompt_ids(PROMPT)
    first = tiny_lm.new_cache()
    tiny_lm.forward(ids, first, -2)
    cache.store(ids, first)
    (entry,) = cache._entries.values()
    saved = [(k.clone(), v.clone()) for k, v in entry.layers]
    for grow in (False, True):
        seeded = tiny_lm.new_cache()
        assert cache.seed(seeded, ids).tokens == len(ids) - 1
        if grow:
            tiny_lm.forward([*ids[-1:], 5, 6, 7], seeded, -2)
            seeded.crop(-2)
        with torch.inference_mode():
            for layer in seeded.layers:
                layer.keys.add_(1.0)  # even an in-place write to the seeded cache
    for (k, v), (k0, v0) in zip(entry.layers, saved, strict=True):
        assert torch.equal(k, k0)
        assert torch.equal(v, v0)


def test_a_pickled_cache_is_empty_with_the_same_bound():
    # a model sent to a Ray worker is pickled: the lock cannot be, the entries need not be
    import pickle

    cache = PrefixCache(1234)
    copy = pickle.loads(pickle.dumps(cache))
    assert isinstance(copy, PrefixCache)
    assert (copy.max_bytes, len(copy), copy.nbytes) == (1234, 0, 0)
