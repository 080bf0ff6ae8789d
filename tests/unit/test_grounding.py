"""Abstention: the evidence (nest_core.grounding) and the decoder's use of it."""

from __future__ import annotations

import pytest
from conftest import PASSAGES

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.config import default_config
from nest_core.decoding.policy import context
from nest_core.grounding import answer_support, question_coverage

pytestmark = pytest.mark.usefixtures("one_thread")

BOOK = [Passage("apt", "APT reads the list of package sources from /etc/apt/sources.list.",
                title="APT"),
        Passage("hold", "To keep a package at its version, mark it with apt-mark hold.",
                title="Pinning")]


def test_question_coverage_is_the_best_passages_share_of_the_question():
    # caught: the sum over passages instead of the best one; names weighed like words
    assert question_coverage("Where does APT read its package sources?", BOOK) == 1.0
    # "price" is in no passage: 2 of the 3 content terms (read, APT, price) are held
    partial = question_coverage("What price does APT read?", BOOK)
    assert partial == pytest.approx((1.0 + 1.5) / (1.0 + 1.5 + 1.0))
    assert question_coverage("What price?", BOOK) == 0.0
    assert question_coverage("What is it?", BOOK) == 0.0  # no content word
    assert question_coverage("Where does APT read?", []) == 0.0


def test_answer_support_counts_the_answers_new_words_the_context_holds():
    # caught: the question's own words counted as support; all words instead of new ones
    q = "Where does APT read its package sources?"
    assert answer_support(q, "APT reads them from /etc/apt/sources.list.", BOOK) == 1.0
    assert answer_support(q, "APT reads them from the cloud registry.", BOOK) == 0.0
    # new words: "list" (held), "registry" (not); "sources" was asked
    assert answer_support(q, "APT sources.list registry", BOOK) == 0.5
    assert answer_support(q, "APT package sources", BOOK) == 1.0  # adds nothing


def _decoder(tiny_lm, **overrides):
    return NestDecoder(tiny_lm, default_config("tiny", **overrides))


def test_a_question_the_passages_do_not_hold_gets_the_abstention(tiny_lm):
    # caught: the threshold compared the wrong way; the abstention carrying spans or tokens
    dec = _decoder(tiny_lm, abstain_below=0.5, abstention="Not in the documents.")
    res = dec.generate("What is the price of a Pomona robot?", PASSAGES, max_new_tokens=8)
    assert res.abstained
    assert res.finish_reason == "abstained"
    assert res.text == "Not in the documents."
    assert (res.token_ids, res.spans, res.matches) == ([], [], [])
    chunks = list(dec.stream("What is the price of a Pomona robot?", PASSAGES,
                             max_new_tokens=8))
    assert [c.text for c in chunks] == ["Not in the documents."]
    answered = dec.generate("Who founded the Zephyr Widget Company?", PASSAGES,
                            max_new_tokens=8)
    assert not answered.abstained
    assert answered.token_ids
    # no passages: nothing to abstain against, the plain LM answers (documented fallback)
    assert not dec.generate("What is the price of a Pomona robot?", None,
                            max_new_tokens=4).abstained


def test_an_answer_the_context_does_not_support_is_withheld(tiny_lm):
    # caught: support ignored, or checked against all passages instead of the shown context
    q = "Who founded the Zephyr Widget Company?"
    copying = {"verify_against": "mixture", "confidence_offset": 1.0, "relaxation": 1e-6}
    dec = _decoder(tiny_lm, **copying)
    free = dec.generate(q, PASSAGES, max_new_tokens=12)
    shown = context(dec.config, q, q, PASSAGES).shown  # the focus sentence
    assert [p.id for p in shown] == ["zw"]
    support = answer_support(q, free.text, shown)
    # the random model copies "Quillfeather", then stops mid-number: "19" is its own
    assert 0.0 < support < 1.0, free.text
    strict = _decoder(tiny_lm, **copying, support_below=support + 0.01)
    lenient = _decoder(tiny_lm, **copying, support_below=support - 0.01)
    assert strict.generate(q, PASSAGES, max_new_tokens=12).abstained
    kept = list(lenient.stream(q, PASSAGES, max_new_tokens=12))
    result = kept[-1].result
    assert result is not None
    assert not result.abstained
    assert result.token_ids == free.token_ids
    assert [t for c in kept for t in c.token_ids] == result.token_ids


def test_abstention_settings_are_validated():
    with pytest.raises(ValueError, match="abstain_below"):
        NestConfig(abstain_below=1.5)
    with pytest.raises(ValueError, match="abstention"):
        NestConfig(abstention=" ")
