"""Matched attribution (nest_core.matching): what counts, where it is cited, exact offsets.

Every test checks the span invariant ``output[out_start:out_end] == span.text ==
passage.text[src_start:src_end]`` through :func:`matches`, and each rule is tested on both
sides of its boundary, so a loosened or broken rule fails here.
"""

from __future__ import annotations

import pytest

from nest_core.matching import MIN_WORDS, find_word_aligned, match_spans
from nest_core.types import NestResult, Passage, Span

HISTORY = Passage(id="history", title="History",
                  text="Halvorsen Orchard Robotics was founded in 2009 by Odile Halvorsen in "
                       "Ghent. Its lab is room 854 of the BFA building, 3.5 km from the port.")
ROOMS = Passage(id="rooms", text="Ghent lies in Belgium. Room 8540 holds 85 chairs; room 854 "
                                 "holds 12.")


def matches(text: str, passages: list[Passage], copied: list[Span] | None = None
            ) -> list[tuple[str, str, int]]:
    """``(text, passage id, src_start)`` of each matched span, after checking the span
    invariant and the fields every matched span must have."""
    spans = match_spans(text, passages, copied or [])
    for s in spans:
        assert text[s.out_start:s.out_end] == s.text == s.passage.text[s.src_start:s.src_end]
        assert s.text == s.text.strip()
        assert s.text
        assert (s.kind, s.token_start, s.token_end, s.num_tokens) == ("matched", 0, 0, 0)
    assert [s.out_start for s in spans] == sorted(s.out_start for s in spans)
    return [(s.text, s.passage.id, s.src_start) for s in spans]


def copied_span(text: str, piece: str, passage: Passage) -> Span:
    start, src = text.index(piece), passage.text.index(piece)
    return Span(text=piece, out_start=start, out_end=start + len(piece), passage=passage,
                src_start=src, src_end=src + len(piece), token_start=3, token_end=6)


# --- what is matched, exactly -------------------------------------------------------------
def test_longest_stretches_are_cited_with_exact_offsets() -> None:
    out = "The company was founded in 2009 by Odile Halvorsen, 3.5 km away."
    assert matches(out, [HISTORY]) == [
        ("was founded in 2009 by Odile Halvorsen", "history", 27),
        ("3.5 km", "history", 117),
    ]


def test_matching_is_case_sensitive() -> None:
    assert matches("It was in ghent, in Room 854.", [HISTORY]) == [
        ("854", "history", HISTORY.text.index("854"))]
    assert matches("It was in ghent, in room 854.", [HISTORY]) == [
        ("room 854", "history", HISTORY.text.index("room 854"))]


# --- word boundaries, in the output and in the source -------------------------------------
@pytest.mark.parametrize(("out", "source"), [
    ("It holds 85 chairs.", "Room 854 is here."),      # "85" inside "854"
    ("It is room 854 now.", "Room 85 is here."),       # "854" is not "85"
    ("It is 3 km away.", "It is 3.5 km away."),        # "3" inside "3.5"
    ("It is 5 km away.", "It is 3.5 km away."),        # "5" inside "3.5"
    ("It is in Ghent now.", "It is in Ghent-Brugge."),  # a name inside a compound
    ("Call Halvorsens now.", "Call Halvorsen now."),    # a word cut short in the output
])
def test_matches_never_start_or_end_mid_word(out: str, source: str) -> None:
    assert matches(out, [Passage(id="p", text=source)]) == []


@pytest.mark.parametrize(("out", "source", "expected"), [
    ("It holds 85 chairs.", "85. It holds", "85"),           # a joiner then a space: a cut
    ("We met Odile today.", "It is Odile's lab.", "Odile"),  # an apostrophe does not join
    ("Room (854) is it.", "Room 854, then", "854"),          # punctuation around: a cut
])
def test_word_boundaries_around_punctuation(out: str, source: str, expected: str) -> None:
    assert [m[0] for m in matches(out, [Passage(id="p", text=source)])] == [expected]


def test_the_word_aligned_occurrence_is_cited_not_the_first_substring() -> None:
    # "854" first occurs inside "8540"; the citation points at the standalone "854"
    aligned = ROOMS.text.index("854 holds 12")
    assert ROOMS.text.index("854") < aligned
    assert matches("Go to 854 now.", [ROOMS]) == [("854", "rooms", aligned)]
    assert find_word_aligned(ROOMS.text, "854") == aligned
    assert find_word_aligned("8540 and 1854", "854") == -1


# --- the minimum match, both sides of each rule -------------------------------------------
@pytest.mark.parametrize("out", [
    "Ours is the one of the best.",  # "of the", "is the": common words
    "Ask about the room of the day.",  # "the", "room", "of the": common, too short
    "There is 1 now.",  # a lone digit
    "It is in the lab.",  # "in the lab": three common words
])
def test_shared_vocabulary_is_not_a_citation(out: str) -> None:
    source = Passage(id="p", text="This is the best room of the house, with 1 lab in the lab.")
    assert matches(out, [source]) == []


def test_four_words_are_a_citation_three_are_not() -> None:
    source = Passage(id="p", text="we think the cat sat on the mat today")
    assert MIN_WORDS == 4
    assert matches("a dog sat on the rug", [source]) == []  # "sat on the": 3 words
    assert matches("a cat sat on the rug", [source]) == [("cat sat on the", "p", 13)]


@pytest.mark.parametrize(("out", "cited"), [
    ("It is 85 now.", ["85"]),          # two digits
    ("It is 2019 now.", ["2019"]),
    ("It is 3.5 now.", ["3.5"]),        # a decimal is one word
    ("It takes 7 days now.", ["7 days"]),  # a lone digit inside a longer stretch
    ("It is 7 now.", []),               # a lone digit is not
])
def test_numbers(out: str, cited: list[str]) -> None:
    source = Passage(id="p", text="Wait 7 days: 85 or 2019 or 3.5 is it.")
    assert [m[0] for m in matches(out, [source])] == cited


@pytest.mark.parametrize(("out", "cited"), [
    ("The BFA is big.", ["BFA"]),       # all capitals, even at a sentence start
    ("Buy an iPhone now.", ["iPhone"]),  # a capital after the first letter
    ("Go to the lab.", []),
])
def test_codes(out: str, cited: list[str]) -> None:
    source = Passage(id="p", text="the lab, the BFA and the iPhone")
    assert [m[0] for m in matches(out, [source])] == cited


def test_a_name_mid_sentence_is_a_citation() -> None:
    source = Passage(id="p", text="Ghent lies in Belgium.")
    assert matches("The office is in Ghent.", [source]) == [("Ghent", "p", 0)]
    assert matches("The office is near Belgium, I think.", [source]) == [("Belgium", "p", 14)]


@pytest.mark.parametrize(("source", "cited"), [
    ("Offices in Ghent and Lyon.", True),   # the passage writes it as a name
    ("Ghent lies in Belgium.", False),      # capitalised only at a sentence start there
    ("Ghent, or ghent, lies in it.", False),  # also written in lower case
])
def test_a_sentence_initial_name_needs_the_passage_to_treat_it_as_one(source: str,
                                                                      cited: bool) -> None:
    out = "Ghent. It is there."
    assert [m[0] for m in matches(out, [Passage(id="p", text=source)])] == \
        (["Ghent"] if cited else [])


@pytest.mark.parametrize("out", [
    "The answer.", "It works.", "Yes: The answer.", "- The answer.", "x\n\"The answer.",
    "Why? The answer.",
])
def test_sentence_initial_common_words_are_not_names(out: str) -> None:
    source = Passage(id="p", text="Here it ends. It works. The answer is the end.")
    assert matches(out, [source]) == []


def test_the_same_capital_mid_sentence_is_a_name() -> None:
    source = Passage(id="p", text="Here it ends. It works. The answer is the end.")
    assert matches("So The answer.", [source]) == [("The answer", "p", 24)]


def test_sentence_initial_word_cited_when_the_passage_uses_it_mid_sentence() -> None:
    # "The" is written capitalised mid-sentence in "In The Hague" and never as "the"
    source = Passage(id="p", text="Embassies are in The Hague. The end.")
    assert [m[0] for m in matches("The end.", [source])] == ["The end"]
    lower = Passage(id="q", text="Embassies are in The Hague. The end of the day.")
    assert matches("The end.", [lower]) == []


def test_single_capital_letters_are_not_names() -> None:
    source = Passage(id="p", text="Then I said: take plan A and go.")
    assert matches("So I took plan A today.", [source]) == []


# --- which passage ------------------------------------------------------------------------
def test_the_highest_ranked_passage_holding_the_stretch_is_cited() -> None:
    first = Passage(id="first", text="Room 854 is closed.")
    second = Passage(id="second", text="The room 854 is open.")
    assert matches("Go to 854.", [first, second]) == [("854", "first", 5)]
    assert matches("Go to 854.", [second, first]) == [("854", "second", 9)]


def test_a_longer_stretch_beats_a_higher_rank() -> None:
    first = Passage(id="first", text="Room 854 is closed.")
    second = Passage(id="second", text="The room 854 is open.")
    assert matches("Yes, room 854 is open today.", [first, second]) == [
        ("room 854 is open", "second", 4)]


def test_rank_falls_to_the_first_passage_where_the_stretch_is_a_citation() -> None:
    # "Ghent" at a sentence start: not a name in `first` (sentence-initial there too)
    first = Passage(id="first", text="Ghent lies in Belgium.")
    second = Passage(id="second", text="We met in Ghent.")
    assert matches("Ghent.", [first, second]) == [("Ghent", "second", 10)]


def test_no_passages_or_empty_ones_match_nothing() -> None:
    assert match_spans("Room 854.", [], []) == []
    assert match_spans("Room 854.", [Passage(id="e", text="")], []) == []
    assert match_spans("", [HISTORY], []) == []


# --- copied spans are not matched again ---------------------------------------------------
def test_copied_regions_are_not_matched_and_split_stretches() -> None:
    out = "It was founded in 2009 by Odile Halvorsen in Ghent."
    copied = [copied_span(out, "Odile Halvorsen", HISTORY)]
    assert matches(out, [HISTORY]) == [("was founded in 2009 by Odile Halvorsen in Ghent",
                                        "history", 27)]
    assert matches(out, [HISTORY], copied) == [("was founded in 2009 by", "history", 27),
                                               ("in Ghent", "history", 66)]


def test_a_word_partly_copied_is_not_matched() -> None:
    out = "Room 854 it is."
    part = Span(text="85", out_start=5, out_end=7, passage=ROOMS, src_start=28, src_end=30,
                token_start=1, token_end=2)
    assert matches(out, [HISTORY], [part]) == []
    assert matches(out, [HISTORY]) == [("854", "history", 92)]


# --- the result and the decoder ------------------------------------------------------------
def test_result_keeps_matches_apart_from_the_copied_metrics() -> None:
    from nest_core.types import DecodeStats

    out = "Room 854 is it."
    copied = copied_span(out, "Room", ROOMS)
    found = match_spans(out, [ROOMS], [copied])
    result = NestResult(text=out, token_ids=[1, 2, 3, 4], spans=[copied], passages=[ROOMS],
                        stats=DecodeStats(), finish_reason="eos", matches=found)
    assert result.attribution_ratio == 3 / 4
    assert result.mean_span_length == 3
    d = result.to_dict()
    assert [m["text"] for m in d["matches"]] == ["854"]
    assert d["matches"][0]["kind"] == "matched"
    assert d["spans"][0]["kind"] == "copied"
    # positional construction (older callers) still works; matches default to none
    legacy = NestResult(out, [1], [copied], [ROOMS], DecodeStats(), "eos", False)
    assert legacy.matches == []
    assert Span("x", 0, 1, ROOMS, 0, 1, 0, 1, 0).kind == "copied"


PROMPT = "The Zephyr Widget Company was"


def test_decoder_fills_matches_on_the_last_chunk(tiny_lm) -> None:
    """The LM's own text (mode="base": nothing copied) found in a passage is matched."""
    from nest_core import NestConfig, NestDecoder

    base = NestDecoder(tiny_lm, NestConfig(mode="base"))
    own = base.generate(PROMPT, None, max_new_tokens=12)
    assert own.matches == []
    assert own.spans == []
    written = own.text.strip()
    passages = [Passage(id="other", text="Nothing here."),
                Passage(id="holds", text=f"Before. {written} after")]
    chunks = list(base.stream(PROMPT, passages, max_new_tokens=12))
    result = chunks[-1].result
    assert result is not None
    assert all(c.result is None for c in chunks[:-1])
    assert result.text == own.text
    assert result.spans == []
    assert result.matches == match_spans(result.text, passages, [])
    assert result.matches, "the LM's own words are in the passage"
    first = result.matches[0]
    assert (first.passage.id, first.src_start, first.kind) == ("holds", len("Before. "),
                                                               "matched")
    assert written.startswith(first.text)
    assert base.generate(PROMPT, passages, max_new_tokens=12).matches == result.matches


def test_decoder_matches_never_overlap_copied_spans(tiny_lm) -> None:
    from nest_core import NestDecoder
    from tests.conftest import TINY_CORPUS

    passages = [Passage(id=f"p{i}", text=t) for i, t in enumerate(TINY_CORPUS)]
    result = NestDecoder(tiny_lm).generate(PROMPT, passages, max_new_tokens=24)
    assert result.spans, "the tiny model copies"
    assert result.matches == match_spans(result.text, passages, result.spans)
    for m in result.matches:
        assert all(m.out_end <= s.out_start or m.out_start >= s.out_end for s in result.spans)


# --- rule 5 (rare words) and word rests ---------------------------------------------------
THAI = Passage(id="thai", text="Thai: code tha, ISO 639-1 code th (individual language).")
TAGALOG = Passage(id="tgl", text="Tagalog: code tgl, ISO 639-1 code tl (individual language).")


def test_a_word_only_one_retrieved_passage_holds_is_a_citation() -> None:
    # caught: rule 5 dropped; other passages not checked; a stop word or a 2-letter word
    assert matches("The code is tha.", [TAGALOG, THAI]) == [("tha", "thai", 11)]
    assert matches("The code is tha.", [THAI]) == []  # one passage: nothing to contrast
    both = Passage(id="both", text="tha is a code, tgl too")
    assert matches("The code is tha.", [THAI, both]) == []  # not rare: two passages hold it
    assert matches("It is th.", [TAGALOG, THAI]) == []  # two letters
    assert matches("the individual language", [TAGALOG, THAI]) == []  # both hold them


def test_the_rest_of_a_word_the_copy_path_began_is_cited_with_it() -> None:
    # caught: rests not found; found without checking the source; not word-aligned there
    source = Passage(id="bh", text="Bahrain: numeric code 048.\nBelgium: numeric code 9048.")
    out = "The code is 048."
    at = source.text.index("48.")
    copied = Span(text="48.", out_start=13, out_end=16, passage=source, src_start=at,
                  src_end=at + 3, token_start=4, token_end=6)
    assert matches(out, [source], [copied]) == [("0", "bh", at - 1)]
    wrong = Span(text="48.", out_start=13, out_end=16, passage=source,
                 src_start=source.text.rindex("48."), src_end=source.text.rindex("48.") + 3,
                 token_start=4, token_end=6)
    assert matches(out, [source], [wrong]) == []  # "9048": "0" would end inside a word
    tail = Span(text="The code is 0", out_start=0, out_end=13, passage=Passage(
        id="t", text="The code is 048."), src_start=0, src_end=13, token_start=0, token_end=5)
    assert matches(out, [tail.passage], [tail]) == [("48", "t", 13)]
