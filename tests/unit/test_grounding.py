"""Abstention: the evidence (nest_core.grounding) and the decoder's use of it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PASSAGES, PROMPT

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.config import default_config
from nest_core.decoding.policy import context
from nest_core.grounding import (
    answer_support,
    familiar,
    missing_names,
    missing_rare_words,
    relevance,
)
from nest_core.stores.embeddings import HashingEmbeddings

pytestmark = pytest.mark.usefixtures("one_thread")

BOOK = [Passage("apt", "APT reads the list of package sources from /etc/apt/sources.list.",
                title="APT"),
        Passage("hold", "To keep a package at its version, mark it with apt-mark hold.",
                title="Pinning")]


def test_relevance_is_the_best_cosine_between_question_and_passage():
    # caught: the first passage instead of the best; the title left out; no normalising
    embed = HashingEmbeddings(256)
    q = "Where does APT read its package sources?"
    vectors = np.asarray(embed([q, "APT\n" + BOOK[0].text, "Pinning\n" + BOOK[1].text]))
    cosines = vectors[1:] @ vectors[0]  # HashingEmbeddings are unit vectors
    assert relevance(q, BOOK, embed) == pytest.approx(float(cosines.max()))
    assert relevance(q, BOOK[::-1], embed) == relevance(q, BOOK, embed)
    assert relevance(q, BOOK, lambda texts: [[3 * x for x in v] for v in embed(texts)]) \
        == pytest.approx(relevance(q, BOOK, embed))
    assert relevance(q, [], embed) == 0.0
    assert relevance("zebra giraffe", BOOK, embed) < relevance(q, BOOK, embed)


def test_answer_support_counts_the_answers_new_words_the_context_holds():
    # caught: the question's own words counted as support; all words instead of new ones
    q = "Where does APT read its package sources?"
    assert answer_support(q, "APT reads them from /etc/apt/sources.list.", BOOK) == 1.0
    assert answer_support(q, "APT reads them from the cloud registry.", BOOK) == 0.0
    # new words: "list" (held), "registry" (not); "sources" was asked
    assert answer_support(q, "APT sources.list registry", BOOK) == 0.5
    assert answer_support(q, "APT package sources", BOOK) == 1.0  # adds nothing


def test_missing_names_are_the_question_names_no_passage_holds_whole():
    # caught: a name held word by word across passages, or by any of its words; the title
    # left out; one passage's holding not enough; lower-case words taken for names
    assert missing_names("How do I run Kubernetes with APT?", BOOK) == [
        frozenset({"kubernet"})]
    assert missing_names("How does Pinning keep a package with APT?", BOOK) == []  # title
    # "Zephyr" and "fox" are both in PASSAGES, never in one passage
    assert missing_names("When did Zephyr Fox start?", PASSAGES) == [
        frozenset({"zephyr", "fox"})]
    assert missing_names("Is the Zephyr Widget Company old?", PASSAGES) == []
    assert missing_names("Does the fox know Marta?", [*PASSAGES[1:], PASSAGES[0]]) == []
    assert missing_names("how do i run kubernetes?", BOOK) == []  # no capital: no name
    assert missing_names("How do I run Kubernetes?", []) == []  # nothing to judge by


def test_a_question_naming_what_no_passage_holds_gets_the_abstention(tiny_lm):
    # caught: the option ignored, or applied when off; the names rule needing an embedder
    # (it is lexical); abstaining without passages
    q = "What does a Pomona robot cost at the Zephyr Widget Company?"  # no "Pomona" anywhere
    on = default_config("tiny", abstain_unnamed=True, abstain_rare=False,
                        abstention="Not in the documents.")
    assert context(on, q, q, PASSAGES).abstain
    assert not context(on, PROMPT, PROMPT, PASSAGES).abstain  # every name held
    assert not context(on, q, q, []).abstain
    assert not context(default_config("tiny", abstain_rare=False), q, q, PASSAGES).abstain
    res = NestDecoder(tiny_lm, on).generate(q, PASSAGES, max_new_tokens=8)
    assert (res.finish_reason, res.text, res.token_ids) == (
        "abstained", "Not in the documents.", [])
    assert not NestDecoder(tiny_lm, on).generate(PROMPT, PASSAGES, max_new_tokens=4).abstained
    with pytest.raises(ValueError, match="abstain_unnamed"):
        NestConfig(abstain_unnamed="yes")  # type: ignore[arg-type]


def test_familiar_words_are_the_vocabularys_by_stem_or_one_affix():
    # caught: the stem or an affix not tried; accents kept; an affix leaving a fragment
    assert all(familiar(w) for w in ("configure", "zones", "apt", "iso", "romania"))
    assert familiar("enlarges")  # by its stem ("enlarge")
    assert all(familiar(w) for w in ("rerun", "writable", "rootless"))  # less one affix
    assert familiar("côte")  # the vocabulary writes it "cote"
    assert not any(familiar(w) for w in ("firewalld", "kubernetes", "fstrim", "totp",
                                         "proxmox", "pomona"))
    assert not familiar("reed" + "zq")  # "re" + a fragment the vocabulary lacks


def test_missing_rare_words_are_the_question_terms_outside_common_english_no_passage_holds():
    # caught: common words counted; a rare word held by one passage (by stem) still counted;
    # lower case not judged (unlike names); no passages judged; other languages judged
    trim = [*BOOK, Passage("trim", "The fstrim.timer unit trims mounted filesystems weekly.")]
    assert missing_rare_words("How do I configure firewalld zones with APT?", trim) == [
        "firewalld"]
    assert missing_rare_words("how do i run kubernetes?", trim) == ["kubernetes"]  # no capital
    assert missing_rare_words("How often does fstrim run?", trim) == []  # held
    assert missing_rare_words("How often does fstrim run with zpool or Podman?", trim) == [
        "zpool", "podman"]
    assert missing_rare_words("How do I run Kubernetes?", []) == []  # nothing to judge by
    # an acronym the vocabulary knows ("ISO") qualifies, it is not the thing asked about
    romania = [Passage("ro", "Romania: alpha-2 code RO, alpha-3 code ROU, numeric code 642.")]
    assert missing_rare_words("What is the ISO 3166-1 numeric code of Romania?", romania) == []
    assert missing_rare_words("What is the TOTP code of Romania?", romania) == ["totp"]
    # not English: no stop word, or most words unknown to the vocabulary
    assert missing_rare_words("Wie lange dauert die Elternzeit bei Zephyr?", PASSAGES) == []
    assert missing_rare_words("Ist die Datei gross?", PASSAGES) == []  # familiar, no stop word
    assert missing_rare_words("Kubernetes Proxmox Nextcloud zpool at fstrim?", trim) == []


def test_a_question_writing_a_rare_word_no_passage_holds_gets_the_abstention(tiny_lm):
    # caught: the option ignored, or applied when off; needing an embedder (it is lexical)
    q = "How do I install firewalld at the Zephyr Widget Company?"
    on = default_config("tiny", abstain_rare=True, abstention="Not in the documents.")
    assert context(on, q, q, PASSAGES).abstain
    assert not context(on, PROMPT, PROMPT, PASSAGES).abstain  # "Zephyr" is held
    assert not context(on, q, q, []).abstain
    assert not context(default_config("tiny", abstain_rare=False), q, q, PASSAGES).abstain
    res = NestDecoder(tiny_lm, on).generate(q, PASSAGES, max_new_tokens=8)
    assert (res.finish_reason, res.text, res.token_ids) == (
        "abstained", "Not in the documents.", [])
    with pytest.raises(ValueError, match="abstain_rare"):
        NestConfig(abstain_rare=1)  # type: ignore[arg-type]


def _decoder(tiny_lm, **overrides):
    return NestDecoder(tiny_lm, default_config("tiny", **overrides))


def test_a_question_far_from_every_passage_gets_the_abstention(tiny_lm):
    # caught: the threshold compared the wrong way; the abstention carrying spans or tokens;
    # abstaining without an embedder (the threshold is on its scale)
    embed = HashingEmbeddings(256)
    far, near = "What is the price of a Pomona robot?", "Who founded the Zephyr Widget Company?"
    threshold = (relevance(far, PASSAGES, embed) + relevance(near, PASSAGES, embed)) / 2
    config = default_config("tiny", abstain_below=threshold, abstain_rare=False,
                            abstention="Not in the documents.")
    dec = NestDecoder(tiny_lm, config, embed=embed)
    res = dec.generate(far, PASSAGES, max_new_tokens=8)
    assert res.abstained
    assert res.finish_reason == "abstained"
    assert res.text == "Not in the documents."
    assert (res.token_ids, res.spans, res.matches) == ([], [], [])
    assert [c.text for c in dec.stream(far, PASSAGES, max_new_tokens=8)] == [
        "Not in the documents."]
    answered = dec.generate(near, PASSAGES, max_new_tokens=8)
    assert not answered.abstained
    assert answered.token_ids
    # no passages: nothing to abstain against, the plain LM answers (documented fallback)
    assert not dec.generate(far, None, max_new_tokens=4).abstained
    # no embedder: no scale for the threshold, no abstention
    assert not NestDecoder(tiny_lm, config).generate(far, PASSAGES, max_new_tokens=4).abstained


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


def test_an_acronym_that_qualifies_the_question_is_not_a_missing_name() -> None:
    """"The ISO 3166-1 code of Romania" is answered by a passage that never says "ISO": a
    name in capitals alone does not count as missing; a real name still does."""
    from nest_core.grounding import missing_names

    romania = [Passage("ro", "Romania: alpha-2 code RO, alpha-3 code ROU, numeric code 642.")]
    assert missing_names("What is the ISO 3166-1 numeric code of Romania?", romania) == []
    assert missing_names("What is the ISO code of Pomona Land?", romania) == [
        frozenset({"pomona", "land"})]
