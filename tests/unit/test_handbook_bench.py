"""The handbook doc-QA benchmark: its question file and its metrics."""

from __future__ import annotations

import pytest

from benchmarks.handbook_qa import (
    SHAPES,
    Question,
    Record,
    check_questions,
    is_cited_right,
    is_right,
    load_questions,
    summarise,
)
from nest_core import Passage, Span


def _q(shape: str, answers: tuple[tuple[str, ...], ...], gold: tuple[str, ...] = ("p/0",)
       ) -> Question:
    return Question("x1", "?", shape, answers, gold)


def test_the_question_file_holds_every_shape_split_dev_and_test():
    questions = load_questions()
    assert len(questions) >= 200
    assert {q.shape for q in questions} == set(SHAPES)
    assert len({q.id for q in questions}) == len(questions)
    splits = [q.split for q in questions]
    assert 0.35 < splits.count("dev") / len(splits) < 0.65
    unanswerable = [q for q in questions if not q.answerable]
    assert len(unanswerable) >= 30
    assert all(q.gold == () and q.answers == () for q in unanswerable)


def test_every_answer_is_in_its_gold_passage():
    # the answers were checked against the text: a changed corpus or file shows here
    from benchmarks import debian_handbook

    try:
        passages = debian_handbook.load_passages()
    except FileNotFoundError:
        pytest.skip(f"debian-handbook is not installed ({debian_handbook.INSTALL_HINT})")
    assert check_questions(load_questions(), passages) == []
    bad = Question("x", "?", "lookup", (("no such words anywhere",),), (passages[0].id,))
    assert check_questions([bad], passages)


def test_right_needs_every_group_and_abstention_only_where_unanswerable():
    two = _q("two-facts", (("5 years", "five years"), ("9 months",)))
    assert is_right(two, "Five years for LTS, 9 months otherwise.", False)
    assert not is_right(two, "Five years for LTS.", False)
    assert not is_right(two, "Five years for LTS, 9 months otherwise.", True)
    assert not is_right(_q("lookup", (("85",),)), "It is 854.", False)  # a whole token
    yes = _q("yesno", (("yes",),))
    assert is_right(yes, "The answer is: Yes, it is.", False)
    assert not is_right(yes, "No. Yes would be wrong.", False)  # the first yes or no
    unanswerable = _q("unanswerable", (), ())
    assert is_right(unanswerable, "The documents do not say.", True)
    assert not is_right(unanswerable, "It costs $100.", False)


def test_cited_right_needs_each_answer_inside_a_span_of_a_gold_passage():
    gold, other = Passage("p/0", "Run apt-file search NAME."), Passage("q/0", "apt-file")
    text = "Use apt-file search."

    def span(passage: Passage, a: int, b: int) -> Span:
        return Span(text=text[a:b], out_start=a, out_end=b, passage=passage, src_start=4,
                    src_end=4 + b - a, token_start=0, token_end=2)

    q = _q("lookup", (("apt-file",),))
    assert is_cited_right(q, text, [span(gold, 4, 19)])
    assert not is_cited_right(q, text, [span(other, 4, 12)])  # not the gold passage
    assert not is_cited_right(q, text, [span(gold, 13, 19)])  # not the answer
    assert is_cited_right(_q("yesno", (("yes",),)), "Yes.", [span(gold, 0, 3)])


def test_summary_rates():
    questions = {"a": Question("a", "?", "lookup", (("x",),), ("p/0",)),
                 "u": Question("u", "?", "unanswerable", (), ())}
    recs = [Record("s", "a", "lookup", "x", True, True, False, 1.0, 3),
            Record("s", "u", "unanswerable", "...", True, False, True, 0.5, 0)]
    m = summarise(recs, questions)["s"]
    assert (m["right"], m["cited_right"], m["abstain_unanswerable"],
            m["abstain_answerable"]) == (1.0, 1.0, 1.0, 0.0)
    assert m["seconds_per_answer"] == 0.75
    assert m["cited_wrong"] == 0.0
    wrong = Record("s", "a", "lookup", "y", False, False, False, 1.0, 3, {"cited": True})
    assert summarise([*recs, wrong], questions)["s"]["cited_wrong"] == 1 / 3
