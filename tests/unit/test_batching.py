"""Continuous batching of concurrent generations' forwards (nest_core/batching.py), on tiny
random Llamas of their own (packing switches a model's attention implementation)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import PASSAGES, PROMPT, TINY_CORPUS, make_tiny_model, make_tiny_tokenizer
from tiny_archs import ARCHITECTURES, tiny_lm

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.batching import ForwardBatcher, batcher_for, enable_packing, forward_packed
from nest_core.lm import LanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")

COPY_HEAVY = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                        initial_span_length=2)
CORPUS = [Passage(str(i), text) for i, text in enumerate(TINY_CORPUS)]
QUESTIONS = [PROMPT, "What does a compiler do?", "What do Chroma and FAISS store?",
             "The quick brown fox", "Where was the company founded?"]


def fresh_lm(attn: str = "sdpa", seed: int = 0) -> LanguageModel:
    tok = make_tiny_tokenizer()
    model = make_tiny_model(len(tok), seed=seed)
    model.set_attn_implementation(attn)
    return LanguageModel(model, tok, name=f"tiny-{attn}-{seed}")


@pytest.fixture(scope="module")
def lm() -> LanguageModel:
    return fresh_lm()


def prefilled(lm: LanguageModel, prompts: list[list[int]]) -> list[object]:
    caches = []
    for ids in prompts:
        cache = lm.new_cache()
        lm.forward(ids, cache, key_layer=-1, last_only=True)
        caches.append(cache)
    return caches


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_forward_equals_each_request_alone(attn: str) -> None:
    """Three requests with caches of different lengths feed 3, 1 and 2 tokens in one model
    call: each gets the logits, key-layer states and cache it gets alone."""
    lm = fresh_lm(attn)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (7, 12, 5)]
    steps = [[5, 6, 7], [9], [10, 11]]
    alone_caches, packed_caches = prefilled(lm, prompts), prefilled(lm, prompts)
    alone = [lm.forward(s, c, key_layer=2) for s, c in zip(steps, alone_caches, strict=True)]
    assert enable_packing(lm)
    packed = forward_packed(lm, list(zip(steps, packed_caches, strict=True)), key_layer=2)
    for a, p, s in zip(alone, packed, steps, strict=True):
        assert p.logits.shape == (len(s), lm.vocab_size)
        torch.testing.assert_close(p.logits, a.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(p.hidden, a.hidden, rtol=0, atol=1e-5)
    for a, p in zip(alone_caches, packed_caches, strict=True):
        assert p.get_seq_length() == a.get_seq_length()
        for layer_a, layer_p in zip(a.layers, p.layers, strict=True):
            torch.testing.assert_close(layer_p.keys, layer_a.keys, rtol=0, atol=1e-5)
            torch.testing.assert_close(layer_p.values, layer_a.values, rtol=0, atol=1e-5)


def test_a_new_prompt_is_read_in_the_same_call_as_the_others_steps(lm: LanguageModel
                                                                   ) -> None:
    """A prompt (logits of its last position only) packed with two requests' drafts: each
    gets what it gets alone, the prompt its last position's logits and key-layer state."""
    torch.manual_seed(3)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (7, 12)]
    fresh = torch.randint(3, 300, (9,)).tolist()
    steps = [[5, 6, 7], [9]]
    alone_caches, packed_caches = prefilled(lm, prompts), prefilled(lm, prompts)
    alone = [lm.forward(s, c, key_layer=2) for s, c in zip(steps, alone_caches, strict=True)]
    alone_prompt_cache, packed_prompt_cache = lm.new_cache(), lm.new_cache()
    alone.insert(1, lm.forward(fresh, alone_prompt_cache, key_layer=2, last_only=True))
    assert enable_packing(lm)
    packed = forward_packed(lm, [(steps[0], packed_caches[0]), (fresh, packed_prompt_cache),
                                 (steps[1], packed_caches[1])], key_layer=2,
                            last_only=[False, True, False])
    for a, p in zip(alone, packed, strict=True):
        assert p.logits.shape == a.logits.shape
        assert p.hidden.shape == a.hidden.shape
        torch.testing.assert_close(p.logits, a.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(p.hidden, a.hidden, rtol=0, atol=1e-5)
    assert packed_prompt_cache.get_seq_length() == len(fresh)


def test_packing_leaves_ordinary_forwards_as_they_were() -> None:
    """The switched attention is the model's own for every forward that is not packed:
    prefills, drafts and ``generate`` give the very same numbers."""
    before, after = fresh_lm(), fresh_lm()
    assert enable_packing(after)
    assert enable_packing(after)  # idempotent
    ids = torch.tensor([before.prompt_ids(PROMPT)])
    for lm_ in (before, after):
        lm_.out = lm_.model.generate(ids, max_new_tokens=12, do_sample=False,
                                     pad_token_id=lm_.tokenizer.pad_token_id)
    assert torch.equal(before.out, after.out)
    cb, ca = prefilled(before, [ids[0].tolist()]), prefilled(after, [ids[0].tolist()])
    assert torch.equal(before.forward([5, 6, 7], cb[0], 2).logits,
                       after.forward([5, 6, 7], ca[0], 2).logits)


@pytest.mark.parametrize("config", [NestConfig(), COPY_HEAVY, NestConfig(mode="base")])
def test_answers_decoded_together_equal_answers_decoded_alone(lm: LanguageModel,
                                                              config: NestConfig) -> None:
    """generate_many: five questions of different lengths and answer budgets share forwards
    (requests leave the batch as they end) and each answer is its solo answer, spans too."""
    dec = NestDecoder(lm, config)
    budgets = [24, 9, 30, 16, 20]
    alone = [dec.generate(q, CORPUS, max_new_tokens=n)
             for q, n in zip(QUESTIONS, budgets, strict=True)]
    batcher = batcher_for(lm)
    before = batcher.stats.calls, batcher.stats.forwards
    together = []
    for n in sorted(set(budgets)):  # one call per budget; all start together in each
        picked = [i for i, b in enumerate(budgets) if b == n]
        together += list(zip(picked, dec.generate_many(
            [QUESTIONS[i] for i in picked], [CORPUS] * len(picked), max_new_tokens=n), strict=True))
    many = dec.generate_many(QUESTIONS, [CORPUS] * 5, max_new_tokens=30)
    for i, res in together:
        assert res.token_ids == alone[i].token_ids
        assert [(s.passage.id, s.src_start, s.src_end) for s in res.spans] == \
            [(s.passage.id, s.src_start, s.src_end) for s in alone[i].spans]
    longest = [dec.generate(q, CORPUS, max_new_tokens=30) for q in QUESTIONS]
    assert [r.token_ids for r in many] == [r.token_ids for r in longest]
    calls, forwards = batcher.stats.calls - before[0], batcher.stats.forwards - before[1]
    assert calls > forwards  # forwards were shared


def test_each_answer_keeps_its_own_passages_and_stops(lm: LanguageModel) -> None:
    """Requests with different passages (none, some), stop strings and budgets, together."""
    dec = NestDecoder(lm, COPY_HEAVY)
    passages = [PASSAGES, None, CORPUS[:2], [Passage("x", "Pack my box with five dozen jugs.")]]
    stops = [None, ["e"], None, [" "]]
    alone = [dec.generate(q, p, max_new_tokens=20, stop=s)
             for q, p, s in zip(QUESTIONS, passages, stops, strict=False)]
    together = [dec.generate_many([q], [p], max_new_tokens=20, stop=s)[0]
                for q, p, s in zip(QUESTIONS, passages, stops, strict=False)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    both = dec.generate_many(QUESTIONS[:4], passages, max_new_tokens=20)
    assert [r.passages for r in both] == [p or [] for p in passages]
    assert both[1].spans == []
    assert both[1].stats.copied_tokens == 0


def test_one_request_alone_runs_the_unpacked_forward(lm: LanguageModel) -> None:
    """A forward with no other request waiting is ``lm.forward`` itself: bit for bit."""
    batcher = ForwardBatcher(lm, max_wait=0.0)
    ids = lm.prompt_ids(PROMPT)
    solo, queued = prefilled(lm, [ids]), prefilled(lm, [ids])
    with batcher.session():
        got = batcher.forward([5, 6], queued[0], key_layer=2)
    assert torch.equal(got.logits, lm.forward([5, 6], solo[0], key_layer=2).logits)
    assert (batcher.stats.forwards, batcher.stats.packed) == (1, 0)


def test_a_failed_forward_raises_in_its_caller_and_the_batcher_goes_on(lm: LanguageModel
                                                                       ) -> None:
    batcher = ForwardBatcher(lm)
    cache = lm.new_cache()
    with pytest.raises(IndexError):
        batcher.forward([10**6], cache, key_layer=2)  # no such token id
    out = batcher.forward([5], lm.new_cache(), key_layer=2)
    assert out.logits.shape == (1, lm.vocab_size)


def test_waits_for_every_open_session_then_packs_them(lm: LanguageModel) -> None:
    """Three sessions hand in a forward each: one model call runs all three."""
    batcher = ForwardBatcher(lm, max_wait=5.0)
    caches = prefilled(lm, [[5, 6, 7], [8, 9], [10]])
    results: dict[int, object] = {}
    entered = threading.Barrier(3)

    def request(i: int) -> None:
        with batcher.session():
            entered.wait()
            results[i] = batcher.forward([11 + i], caches[i], key_layer=2)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3
    assert (batcher.stats.forwards, batcher.stats.calls, batcher.stats.packed) == (1, 3, 3)


def test_generate_many_checks_its_arguments(lm: LanguageModel) -> None:
    dec = NestDecoder(lm)
    with pytest.raises(TypeError, match="list of prompts"):
        dec.generate_many("one prompt")
    with pytest.raises(ValueError, match="one entry per prompt"):
        dec.generate_many([PROMPT, PROMPT], [PASSAGES])
    assert dec.generate_many([]) == []


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packing_on_every_tested_architecture(arch: str, dtype: torch.dtype) -> None:
    """Llama, Qwen, Mistral, Gemma and Phi-3 layouts: a packed forward equals each request
    alone, past the sliding window too (prompts of 7, 20 and 30 tokens, window 16), bit for
    bit in bfloat16 (a forward alone packed too, each request's attention at its own shapes,
    paired-row linears), and answers decoded together are the answers decoded alone."""
    lm = tiny_lm(arch, dtype)
    batcher = batcher_for(lm)  # a forward alone: unpacked in fp32, a pack of one in bf16
    assert batcher.packs
    torch.manual_seed(2)
    prompts = [torch.randint(3, 300, (n,)).tolist() for n in (7, 20, 30)]
    steps = [[5, 6, 7], [9], [10, 11, 12, 13]]
    alone_caches, packed_caches = prefilled(lm, prompts), prefilled(lm, prompts)
    alone = [batcher.forward(s, c, key_layer=2)
             for s, c in zip(steps, alone_caches, strict=True)]
    packed = forward_packed(lm, list(zip(steps, packed_caches, strict=True)), key_layer=2)
    tol = 1e-5 if dtype == torch.float32 else 0.0
    for a, p in zip(alone, packed, strict=True):
        torch.testing.assert_close(p.logits, a.logits, rtol=0, atol=tol)
        torch.testing.assert_close(p.hidden, a.hidden, rtol=0, atol=tol)
    dec = NestDecoder(lm, COPY_HEAVY)
    alone_answers = [dec.generate(q, CORPUS, max_new_tokens=24) for q in QUESTIONS[:3]]
    together = dec.generate_many(QUESTIONS[:3], [CORPUS] * 3, max_new_tokens=24)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone_answers]
