"""Question focus (``focus_sentences``) and question drafts (``question_drafts``): the
sentence ranking on real handbook text, the row mask, the proposer's start filter, and the
decoder end to end on the tiny random Llama."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import PASSAGES
from test_rules import CountingLM, _toy_belief, _toy_index

from nest_core import NestConfig, NestDecoder, Passage
from nest_core.decoding.drafters import SHORT_DRAFT, PromptLookup, RetrievedSpans
from nest_core.focus import (
    NAME_WEIGHT,
    best_sentences,
    continues_passage,
    focus_passages,
    question_weights,
    split_sentences,
    stem,
)
from nest_core.prompts import BACKGROUND_INSTRUCTION, format_background, with_background
from nest_core.token_index import TokenIndex

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def handbook(*names: str) -> list[Passage]:
    return [Passage(id=n, text=(DATA / f"{n}.md").read_text(encoding="utf-8")) for n in names]


def best_text(question: str, passages: list[Passage], k: int = 1) -> list[str]:
    return [passages[s.passage_index].text[s.start:s.end]
            for s in best_sentences(question, passages, k)]


def test_split_sentences_on_lines_and_sentence_ends():
    text = "First one. Second one!\n\n  Third: no end\nFourth?  "
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "First one.", "Second one!", "Third: no end", "Fourth?"]


def test_abbreviations_and_initials_do_not_end_a_sentence():
    # caught: the plain ". + space" rule (issue 25: "approx." cut the answer off its line)
    text = ("Dr. Smith, e.g. the CTO, signs it. J. R. Smith agrees.\nU.S. staff: 3 days. "
            "It ends here. but not here? Yes. 40 EUR per day.")
    assert [text[a:b] for a, b in split_sentences(text)] == [
        "Dr. Smith, e.g. the CTO, signs it.", "J. R. Smith agrees.", "U.S. staff: 3 days.",
        "It ends here. but not here?", "Yes.", "40 EUR per day."]


def test_the_meals_allowance_is_found_whole():
    # issue 25: "approx." split the answer's sentence, and the focus showed its first half
    passages = [Passage("travel", "Travel costs are reimbursed up to 100% when approved. "
                                  "Meals are reimbursed at approx. 40 EUR per day.")]
    assert best_text("How much is reimbursed for meals per day?", passages) == [
        "Meals are reimbursed at approx. 40 EUR per day."]


def test_plural_and_singular_share_a_stem():
    # issue 25: the suffix stripper made "offic" of "offices" and kept "office" whole
    assert stem("offices") == stem("office")
    assert stem("opened") == stem("open") == stem("opening")
    passages = [Passage("o", "Staff may work remotely. The office in Ghent has 40 desks.")]
    assert best_text("How many offices are there?", passages) == [
        "The office in Ghent has 40 desks."]


def test_the_ghent_office_opening_is_found_not_the_bicycle_scheme_it_started():
    # both sentences hold "Ghent office"; only one says when it opened ("open" ~ "opened")
    passages = handbook("10-benefits", "02-offices")
    (best,) = best_text("When did the Ghent office open?", passages)
    assert best.startswith("The Ghent office in Belgium opened in 2019")


def test_a_name_outweighs_a_common_word():
    # "currency" is rarer than "Euro" here, but the question capitalises Euro: a name
    passages = [Passage("p", "Euro: alphabetic code EUR, numeric code 978.\n"
                             "No currency: alphabetic code XXX, numeric code 999.\n"
                             "Testing: alphabetic code XTS, numeric code 963.")]
    assert question_weights("What is the numeric code of the currency Euro?")[
        frozenset({"euro"})] == NAME_WEIGHT > 1.0
    assert best_text("What is the numeric code of the currency Euro?", passages) == [
        "Euro: alphabetic code EUR, numeric code 978."]


def test_a_many_word_name_counts_once():
    # caught: each word of the company's name counted: its sentences outweigh "headquarters"
    passages = handbook("02-offices", "01-welcome", "04-working-hours", "09-remote-work")
    q = "Where is the headquarters of Halvorsen Orchard Robotics?"
    assert question_weights(q) == {frozenset({"headquart"}): 1.0,
                                   frozenset({"halvorsen", "orchard", "robot"}): NAME_WEIGHT}
    (best,) = best_text(q, passages)
    assert best.startswith("The headquarters is in Dunmore")


def test_a_passage_title_counts_for_each_of_its_sentences():
    # caught on doc-QA dev: the country line names Lithuania in its text, the subdivision
    # line only in its passage's title; without the title the country line won (retrieval
    # order breaks the tie) and the model answered with the country's codes
    passages = [
        Passage("countries", "Latvia: alpha-2 code LV, numeric code 428.\n"
                             "Lithuania: alpha-2 code LT, numeric code 440.",
                title="ISO 3166-1 country codes"),
        Passage("lt", "Alytus (district municipality): LT-03.\n"
                      "Birštonas (municipality): LT-05.\n"
                      "Jonava (district municipality): LT-10.\n"
                      "Švenčionys (district municipality): LT-49.",
                title="ISO 3166-2 subdivision codes of Lithuania"),
    ]
    q = "What is the ISO 3166-2 code of Švenčionys, a district municipality of Lithuania?"
    assert best_text(q, passages) == ["Švenčionys (district municipality): LT-49."]


def test_no_shared_word_means_no_focus():
    assert best_sentences("Quantum chromodynamics?", handbook("02-offices"), 3) == []


def test_focus_passages_keep_retrieval_order_ids_and_text_order():
    passages = [Passage("a", "Alpha one. Beta two. Gamma three.", title="A"),
                Passage("b", "Beta four. Delta five.")]
    best = best_sentences("beta gamma delta", passages, 3)
    out = focus_passages(passages, best)
    assert [(p.id, p.title, p.text) for p in out] == [
        ("a", "A", "Beta two. ... Gamma three."), ("b", None, "Delta five.")]


def test_rows_within_marks_the_rows_of_a_sentence():
    index = _toy_index()  # passage i, token j covers characters j:j+1 of "abc"
    mask = index.rows_within([(1, 1, 2), (2, 0, 1)])
    assert mask.tolist() == [False, False, False, False, True, True, False]


def _spans(index: TokenIndex, start_rows: torch.Tensor | None = None) -> RetrievedSpans:
    return RetrievedSpans(index, 0.5, initial_length=1, max_length=1, start_rows=start_rows)


def test_spans_start_only_at_allowed_rows():
    # caught: start_rows ignored; carriers filtered by the wrong rows
    index = _toy_index()
    belief = _toy_belief(index, query=0.0, top_token=7, lam=0.1)
    # carriers of 7 by distance: row 5 (passage 2), row 3 (passage 1), row 1 (passage 0)
    assert _spans(index).rows(belief, None, 1) == [5]
    only_p0 = torch.tensor([True, True, True, False, False, False, False])
    assert _spans(index, only_p0).rows(belief, None, 1) == [1]
    none = torch.zeros(7, dtype=torch.bool)
    assert _spans(index, none).rows(belief, None, 1) == []


def test_prompt_lookup_drafts_what_follows_the_latest_longest_match():
    # caught: the picked token left out of the draft or of the match; the earliest match
    # taken mid-answer, the latest for the first token; a match of the picked token alone
    # drafting full length mid-answer
    q = [5, 6, 7, 8, 6, 7, 9, 4, 2]
    look = PromptLookup(q, 64)
    assert look.tokens([1, 6], 7, 3) == [7, 9, 4]  # "6 7" last seen before 9
    assert look.tokens([7, 8], 6, 3) == [6, 7, 9]
    assert look.tokens([3], 2, 4) == []  # at the prompt's end: nothing follows
    assert look.tokens([3], 1, 4) == []  # not in the prompt
    assert look.tokens([7], 8, 9) == [8, 6, 7, 9, 4, 2]  # "7 8": as long as asked
    assert look.tokens([3], 8, 9) == [8, 6, 7, 9][:SHORT_DRAFT]  # "8" alone: short
    assert look.tokens([], 8, 9) == [8, 6, 7, 9, 4, 2]  # the answer's first token
    # the answer's first token drafts from its earliest occurrence (a restatement follows
    # the question from its start), a later token from its latest
    assert look.tokens([], 6, 3) == [6, 7, 8]
    assert look.tokens([3], 6, 3) == [6, 7, 9]


def test_prompt_lookup_matches_words_across_case_and_a_leading_space(tiny_lm):
    # caught: ids compared instead of words (the answer's "The" never finds " the")
    q = tiny_lm.tokenizer.encode("What is the capital of France?", add_special_tokens=False)
    the = tiny_lm.tokenizer.encode("The", add_special_tokens=False)
    assert len(the) == 1
    assert the[0] not in q
    look = PromptLookup(q, 64, key=tiny_lm.token_word)
    after = q[q.index(tiny_lm.tokenizer.encode(" the", add_special_tokens=False)[0]) + 1:]
    assert look.tokens([], the[0], 4) == [the[0], *after[:3]]
    assert PromptLookup(q, 64).tokens([], the[0], 4) == []


FOCUS = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                   initial_span_length=2, passages_in_prompt=True, focus_sentences=1)


def test_decoder_shows_the_focus_sentence_and_copies_only_from_it(tiny_lm):
    # caught: the whole passages in the prompt; span_starts not passed to the generation
    question = "Who founded the Zephyr Widget Company, and where?"
    passages = [*PASSAGES, Passage("extra", "Widgets are small. The Zephyr Widget Company "
                                            "sells widgets. Zephyr winds blow west.")]
    (best,) = best_sentences(question, passages, 1)
    assert passages[best.passage_index].id == PASSAGES[0].id
    lm = CountingLM(tiny_lm)
    res = NestDecoder(lm, FOCUS).generate(question, passages, max_new_tokens=30)
    shown = tiny_lm.decode(lm.calls[0])
    assert PASSAGES[0].text in shown
    assert "sells widgets" not in shown
    assert PASSAGES[1].text not in shown
    free = NestDecoder(tiny_lm, FOCUS.with_overrides(focus_sentences=None)).generate(
        question, passages, max_new_tokens=30)
    assert any(s.passage.id != PASSAGES[0].id for s in free.spans), "must discriminate"
    assert res.spans
    for s in res.spans:  # every span starts in the focus sentence (then may read on)
        assert s.passage.id == PASSAGES[0].id
        assert best.start <= s.src_start < best.end


def test_repeat_question_asks_before_and_after_the_background(tiny_lm):
    # caught: the paper's shape (instruction, background, request) when repeat_question asks
    # for request, background, request; messages keep their earlier turns
    question = "Who founded the Zephyr Widget Company, and where?"
    lm = CountingLM(tiny_lm)
    NestDecoder(lm, FOCUS.with_overrides(repeat_question=True)).generate(
        question, PASSAGES, max_new_tokens=2)
    shown = tiny_lm.decode(lm.calls[0])
    first, bg, last = shown.index(question), shown.index("Background:"), shown.rindex(question)
    assert first < bg < last
    assert PASSAGES[0].text in shown[bg:last]
    assert BACKGROUND_INSTRUCTION not in shown
    paper = with_background(question, PASSAGES[:1])
    bg_text = format_background(PASSAGES[:1])
    assert paper == f"{BACKGROUND_INSTRUCTION}\nBackground:\n{bg_text}\n\n{question}"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": question}]
    wrapped = with_background(chat, PASSAGES[:1], repeat_question=True)
    assert wrapped[:2] == chat[:2]
    assert wrapped[2]["content"] == (f"{question}\n\nBackground:\n{bg_text}"
                                     f"\n\n{question}")


class ScriptedLM(CountingLM):
    """The tiny LM whose own argmax at answer position i is ``script[i]`` (a +30 logit);
    ``close[i]`` is a runner-up 0.3 logits below it (within 2x after the 0.7 temperature)."""

    def __init__(self, lm, prompt_len: int, script: list[int],
                 close: dict[int, int] | None = None) -> None:
        super().__init__(lm)
        self.prompt_len, self.script, self.close = prompt_len, script, close or {}

    def forward(self, input_ids, cache, key_layer, last_only=False):
        before = cache.get_seq_length()
        out = super().forward(input_ids, cache, key_layer, last_only=last_only)
        logits = out.logits.clone()
        last = before + len(input_ids) - 1  # sequence position of the last logits row
        for i in range(logits.shape[0]):
            answer_pos = last - (logits.shape[0] - 1 - i) + 1 - self.prompt_len
            if 0 <= answer_pos < len(self.script):
                top = logits[i].max() + 30.0
                if answer_pos in self.close:
                    logits[i, self.close[answer_pos]] = top - 0.3
                logits[i, self.script[answer_pos]] = top
        return type(out)(logits=logits, hidden=out.hidden)


def test_question_drafts_change_nothing_but_the_forward_count(tiny_lm):
    # caught: question drafts verified relaxed (not exact) or not at all; their rows masked
    # or cited; the lookup never consulted
    cfg = NestConfig(mode="base", relaxation=1.0, verify_against="lm")
    prompt = "The quick brown fox jumps over the lazy dog."
    q = tiny_lm.tokenizer.encode(prompt, add_special_tokens=False)
    assert len(q) >= 8
    # restates the question, strays (the lookup proposes q[4:], the LM says q[1] and finds
    # q[4] nearly as likely: relaxed verification would take it), goes on
    script = [*q[:4], q[1], *q[2:6]]
    n = len(tiny_lm.prompt_ids(prompt))
    plain = NestDecoder(ScriptedLM(tiny_lm, n, script, {4: q[4]}), cfg).generate(
        prompt, PASSAGES, max_new_tokens=len(script))
    assert plain.token_ids == script
    lm = ScriptedLM(tiny_lm, n, script, {4: q[4]})
    fast = NestDecoder(lm, cfg.with_overrides(question_drafts=True)).generate(
        prompt, PASSAGES, max_new_tokens=len(script))
    assert fast.token_ids == script
    assert fast.spans == []
    assert fast.stats.lm_forwards < plain.stats.lm_forwards
    assert fast.stats.accepted_draft_tokens < fast.stats.drafted_tokens  # one was cut


def test_the_answers_first_word_drafts_the_question_words_after_it(tiny_lm):
    # caught: the decoder's lookup matching token ids ("The" never finds " the": two more
    # forwards); the picked token not looked up with the output (one more); the first
    # word looked up at its latest occurrence (" the dog": two more)
    cfg = NestConfig(mode="base", relaxation=1.0, verify_against="lm", question_drafts=True)
    prompt = "What did the quick brown fox do to the dog?"
    enc = functools.partial(tiny_lm.tokenizer.encode, add_special_tokens=False)
    q, fox = enc(prompt), enc(" quick brown fox")
    at = q.index(enc(" the")[0]) + 1
    assert q[at:at + len(fox)] == fox
    assert enc("The")[0] not in q
    script = [*enc("The"), *fox, enc(" jumps")[0]]
    n = len(tiny_lm.prompt_ids(prompt))
    plain = NestDecoder(ScriptedLM(tiny_lm, n, script), cfg.with_overrides(
        question_drafts=False)).generate(prompt, PASSAGES, max_new_tokens=len(script))
    fast = NestDecoder(ScriptedLM(tiny_lm, n, script), cfg).generate(
        prompt, PASSAGES, max_new_tokens=len(script))
    assert plain.token_ids == fast.token_ids == script
    # the prompt, then "The" + " quick brown fox do?" (" do" rejected: " jumps" is picked)
    assert (plain.stats.lm_forwards, fast.stats.lm_forwards) == (len(script), 2)


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_focus_sentences_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="focus_sentences"):
        NestConfig(focus_sentences=value)


def test_a_prompt_ending_with_a_passages_words_continues_it():
    passages = handbook("02-offices")
    assert continues_passage("Go on: The Ghent office in Belgium opened in 2019 and\nhosts",
                             passages)  # white space aside
    assert not continues_passage("When did the Ghent office in Belgium open?", passages)
    assert not continues_passage("opened in 2019", passages)  # fewer than 6 words


def test_a_continuation_is_decoded_by_the_continuation_settings(tiny_lm):
    # caught: the continuation settings ignored, or used for every prompt
    cfg = FOCUS.with_overrides(continuation=NestConfig(confidence_offset=1.0,
                                                       relaxation=1e-6, span_length=8,
                                                       initial_span_length=2))
    text = PASSAGES[0].text
    prompt = "Continue: " + " ".join(text.split()[:7])
    lm = CountingLM(tiny_lm)
    res = NestDecoder(lm, cfg).generate(prompt, PASSAGES, max_new_tokens=12)
    plain = NestDecoder(tiny_lm, cfg.continuation).generate(prompt, PASSAGES,
                                                            max_new_tokens=12)
    assert res.token_ids == plain.token_ids
    assert text not in tiny_lm.decode(lm.calls[0])  # no background in the prompt
    lm = CountingLM(tiny_lm)
    NestDecoder(lm, cfg).generate("Who founded the Zephyr Widget Company?", PASSAGES,
                                  max_new_tokens=4)
    assert PASSAGES[0].text in tiny_lm.decode(lm.calls[0])  # a question: focus as before


def test_continuation_settings_must_share_the_keys():
    with pytest.raises(ValueError, match="same key_layer"):
        NestConfig(continuation=NestConfig(key_layer=-3))
    with pytest.raises(ValueError, match="without a continuation"):
        NestConfig(continuation=NestConfig(continuation=NestConfig()))


def _concepts(texts: list[str]) -> list[list[float]]:
    """A two-concept embedding: time off (leave, take off) and parties."""
    return [[float("leave" in t.lower() or "take off" in t.lower()),
             float("party" in t.lower())] for t in texts]


def test_meaning_lets_a_paraphrase_win_over_shared_words():
    # caught: meaning ignored, or the lexical score left unscaled (it would dominate)
    passages = [Passage("p", "Staff may bring a baby to the summer party. "
                             "Parental leave lasts 16 weeks.")]
    q = "How long can I take off for a new baby?"
    assert best_text(q, passages) == ["Staff may bring a baby to the summer party."]
    # the party sentence: all the shared words (1.0), cosine 0; the leave one: none, cosine 1
    (tie,) = best_sentences(q, passages, 1, embed=_concepts, meaning=1.0)
    assert passages[0].text[tie.start:tie.end].startswith("Staff")  # a tie keeps text order
    (best,) = best_sentences(q, passages, 1, embed=_concepts, meaning=2.0)
    assert passages[0].text[best.start:best.end] == "Parental leave lasts 16 weeks."
    assert best.score == 0.0 + 2.0 * 1.0
    # weight 0 or no embedder: the words alone decide
    assert best_sentences(q, passages, 1, embed=_concepts, meaning=0.0) == \
        best_sentences(q, passages, 1)
    # nothing shares a word with the question: no focus, whatever the meaning says
    assert best_sentences("Holidays?", passages, 1, embed=_concepts, meaning=1.0) == []
