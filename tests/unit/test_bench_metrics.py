"""The benchmark's metrics and corpus parsing on hand-made strings (fast, no corpus needed)."""

from __future__ import annotations

import pytest

from benchmarks.foldoc import Entry, chunk_entry, clean_line, parse_entry
from benchmarks.tasks import answer_recall, expansions_in, rouge1_f1


def test_rouge1_counts_clipped_unigrams() -> None:
    assert rouge1_f1("the cat sat", "the cat sat") == pytest.approx(1.0)
    # overlap {the:1, cat:1} of 3 predicted and 3 reference tokens -> P = R = 2/3
    assert rouge1_f1("the the cat", "the cat sat") == pytest.approx(2 / 3)
    assert rouge1_f1("", "anything") == 0.0
    assert rouge1_f1("Hello, WORLD!", "hello world") == pytest.approx(1.0)


def test_answer_recall_is_case_and_space_insensitive_containment() -> None:
    golds = ["Basic Input/Output System", "ROM BIOS"]
    assert answer_recall("It means the basic  input/output system.", golds) == 1.0
    assert answer_recall("Basic input output system", golds) == 0.0
    assert answer_recall("anything", ["", "  "]) == 0.0


def test_parse_entry_strips_markup_dates_and_sources() -> None:
    raw = ("Basic Input/Output System\nBIOS\n\n   <operating system> The {firmware} of the\n"
           "   {IBM PC (http://ibm.com/)}.\n\n   [{Jargon File}]\n\n   (2001-02-03)\n")
    entry = parse_entry(raw)
    assert entry == Entry(headwords=("Basic Input/Output System", "BIOS"),
                          paragraphs=("The firmware of the IBM PC.",))
    assert clean_line("see {a {nested} link}") == "see a nested link"


def test_chunks_never_exceed_the_word_budget() -> None:
    entry = Entry(headwords=("x",), paragraphs=(" ".join(["w"] * 250), "tail words"))
    chunks = chunk_entry(entry, 7, max_words=100)
    assert [len(c.text.split()) for c in chunks] == [100, 100, 52]
    assert {c.title for c in chunks} == {"x"}
    assert chunks[0].id == "foldoc-7-0"


def test_acronym_expansions_are_aligned_letter_by_letter() -> None:
    text = ("(NFS) The Network File System, by Sun. HTTP servers use it. "
            "Also Nightmare File System and National Football Stuff")
    assert expansions_in(text, "NFS") == ["Network File System", "Nightmare File System",
                                          "National Football Stuff"]
    assert expansions_in("The HyperText Transfer Protocol, or HTTP servers", "HTTPS") == []
    assert expansions_in("an OpenLook Window Manager", "OLWM") == ["OpenLook Window Manager"]
