"""Ingest whatever the input (issue 26, cases 4 and 5): passages bounded in characters,
binary text refused, zero-width and bidi controls removed with their offsets mapped."""

from __future__ import annotations

import pytest

from nest_core.stores.embeddings import HashingEmbeddings
from nest_core.stores.ingest import (
    MAX_PASSAGE_CHARS,
    Document,
    chunk_document,
    ingest,
    open_faiss_store,
)
from nest_core.stores.text import binary_reason, strip_invisible

EMBED = HashingEmbeddings(64)
INVISIBLES = "\u200b\u200c\u200d\u2060\ufeff\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def test_zero_width_characters_inside_a_number_are_removed():
    """Case 5: "1\u200b5 dollars per day" is stored as "15 dollars per day"."""
    doc = Document(text="Meals cost 1\u200b5 dollars per day.", id="meals")
    (passage,) = chunk_document(doc)
    assert passage.text == "Meals cost 15 dollars per day."
    assert (passage.metadata["start"], passage.metadata["end"]) == (0, len(doc.text))


@pytest.mark.parametrize("char", list(INVISIBLES))
def test_every_invisible_and_bidi_control_is_removed_with_offsets_mapped(char):
    text = f"{char}Alpha beta{char}{char} gamma. Delta{char} epsilon zeta eta.{char}"
    doc = Document(text=text, id="d")
    passages = chunk_document(doc, words_per_passage=3)
    assert [p.text for p in passages] == ["Alpha beta gamma.", "Delta epsilon zeta", "eta."]
    for p in passages:
        start, end = p.metadata["start"], p.metadata["end"]
        assert strip_invisible(text[start:end]).text == p.text
        assert text[start] == p.text[0]
        assert text[end - 1] == p.text[-1]


def test_offsets_are_unchanged_without_invisible_characters():
    text = "One two three. Four five six."
    for p in chunk_document(Document(text=text, id="d"), words_per_passage=3):
        assert text[p.metadata["start"]:p.metadata["end"]] == p.text


def test_a_huge_single_line_is_cut_into_bounded_passages_that_lose_nothing():
    """Case 4: a 200 KB base64 line was one 161,547-token passage; now every passage has at
    most MAX_PASSAGE_CHARS characters and together they hold the whole line."""
    line = ("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=" * 20_000)[:700_000]
    doc = Document(text=f"An image follows: ![x](data:image/png;base64,{line}) the end.", id="img")
    passages = chunk_document(doc)
    assert max(len(p.text) for p in passages) <= MAX_PASSAGE_CHARS
    assert len(passages) >= len(doc.text) // MAX_PASSAGE_CHARS
    assert "".join(p.text.replace(" ", "") for p in passages) == doc.text.replace(" ", "")
    for p in passages:
        assert doc.text[p.metadata["start"]:p.metadata["end"]] == p.text


@pytest.mark.parametrize(("text", "cap"), [("x" * 95, 10), ("a " * 50 + "b" * 40, 12),
                                           ("word " * 30, 16)])
def test_a_lowered_cap_bounds_every_passage(text, cap):
    passages = chunk_document(Document(text=text, id="d"), max_chars=cap)
    assert passages
    assert max(len(p.text) for p in passages) <= cap
    assert "".join(p.text for p in passages).replace(" ", "") == text.replace(" ", "")


def test_nul_text_is_refused_naming_the_document(tmp_path):
    """Case 4: a file of NUL bytes (valid UTF-8) became one 50 MB passage; now ingest
    refuses it before writing anything, naming the document."""
    store = open_faiss_store(tmp_path, embed=EMBED)
    docs = [Document(text="Plain text.", id="ok"),
            Document(text="\x00" * 4096, id="nul", metadata={"source": "blob.md"})]
    with pytest.raises(ValueError, match=r"document 'blob.md': it holds NUL characters"):
        ingest(docs, store, embed=EMBED, progress=False)
    assert len(store) == 0


@pytest.mark.parametrize(("text", "binary"), [
    ("tabs\tand\nnewlines\r\nand a \f form feed", False),
    ("one \x00 NUL", True),
    ("\x01\x02\x03\x04 mostly controls \x05\x06\x07\x08", True),
    ("text with one stray \x1b escape " * 5, False),
])
def test_binary_reason(text, binary):
    assert (binary_reason(text) is not None) is binary
