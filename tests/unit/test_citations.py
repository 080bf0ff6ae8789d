"""The one citation rule (nest_core.citations): exact cases, each caught by a one-line
mutation of the rule (named in the test's comment)."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import PASSAGES, PROMPT

from nest_core import NestDecoder, Passage
from nest_core.citations import MIN_SUPPORT, citations, is_citation
from nest_core.config import default_config
from nest_core.decoding.policy import context, quote
from nest_core.grounding import answer_support
from nest_core.types import DecodeStats, NestResult, Span

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Passage("doc", "Siduction is a distribution based on Sid. It was released in 2009. "
                     "Version 1.424 of the installer.")


def cite(output: str, piece: str, *, after: int = 0, src_after: int = 0,
         kind: str = "copied") -> Span:
    """A span of ``output`` holding ``piece``, found at or after ``after`` in the output and
    ``src_after`` in the passage (the invariant output slice == passage slice holds)."""
    a = output.index(piece, after)
    s = DOC.text.index(piece, src_after)
    tokens = (a, a + 1) if kind == "copied" else (0, 0)
    return Span(text=piece, out_start=a, out_end=a + len(piece), passage=DOC, src_start=s,
                src_end=s + len(piece), token_start=tokens[0], token_end=tokens[1],
                kind=kind)  # type: ignore[arg-type]


def test_a_lone_function_word_digit_or_mark_is_no_citation():
    # caught: MIN_CHARS lowered to 1, or the stop-word test dropped
    out = "It was in 1 of the cases."
    assert not citations([cite(out, "in"), cite(out, "1"), cite(out, ".")], out)
    assert not citations([cite(out, "of the")], out)  # six characters, only stop words


def test_a_word_fragment_is_no_citation():
    # caught: whole_words checking one end only
    out = "Sidney is a distribution"
    assert not is_citation(cite(out, "Sid"), out)  # "Sid" of "Sidney": ends inside a word
    out2 = "Bigsiduction is a distribution"
    frag = Span(text="iduction is a", out_start=4, out_end=17, passage=DOC, src_start=1,
                src_end=14, token_start=0, token_end=3)
    assert out2[4:17] == DOC.text[1:14]
    assert not is_citation(frag, out2)  # starts inside "Bigsiduction"
    assert citations([frag], out2) == []


def test_content_words_numbers_and_whole_stretches_are_citations():
    out = "It was released in 2009. Siduction is a distribution."
    year = cite(out, "2009.")
    name = cite(out, "Siduction is a distribution")
    assert citations([name, year], out) == [year, name]  # output order
    assert is_citation(year, out)
    assert is_citation(name, out)


def test_adjacent_pieces_of_one_passage_merge_into_one_citation():
    # caught: _continues without the gap check (merging across a gap the passage lacks)
    out = "Siduction is a distribution"
    first, rest = cite(out, "Sid"), cite(out, "uction is a")
    assert not is_citation(first, out)  # fragments alone
    assert not is_citation(rest, out)
    merged = citations([rest, first], out)
    assert [(s.text, s.out_start, s.out_end, s.src_start, s.src_end) for s in merged] == [
        ("Siduction", 0, 9, 0, 9)]  # merged, then ended on its content word
    assert (merged[0].token_start, merged[0].token_end) == (first.token_start, rest.token_end)
    # a matched neighbour makes one mark with its copied one: matched (verbatim, not all
    # copied), so a copied "in" is never shown alone beside a matched "2009"
    mixed = citations([first, cite(out, "uction is a", kind="matched")], out)
    assert [(s.text, s.kind, s.num_tokens) for s in mixed] == [("Siduction", "matched", 0)]
    year = "It was released in 2009."
    marks = citations([cite(year, "in"), cite(year, "2009.", kind="matched")], year)
    assert [(s.text, s.kind) for s in marks] == [("in 2009.", "matched")]


def test_pieces_from_different_places_do_not_merge():
    # "1.424" written from scattered single characters of the passage: five fragments
    out = "Version 1.424"
    scattered = [cite(out, "1"), cite(out, ".", after=9),  # the "." of "Sid."
                 cite(out, "4", after=10), cite(out, "2", after=11), cite(out, "4", after=12)]
    assert citations(scattered, out) == []
    whole = cite(out, "1.424")
    assert citations([whole], out) == [whole]


def test_an_unsupported_answer_cites_nothing():
    # caught: the support gate dropped, or compared with > instead of <
    out = "It was released in 2009."
    year = cite(out, "2009.")
    assert citations([year], out, support=None) == [year]
    assert citations([year], out, support=MIN_SUPPORT) == [year]
    assert citations([year], out, support=MIN_SUPPORT - 0.01) == []


def test_the_result_lists_only_citations_and_keeps_its_raw_spans():
    out = "It was in 2009."
    spans = [cite(out, "was"), cite(out, "2009.")]  # "was" of "It was released"
    res = NestResult(text=out, token_ids=[1, 2, 3], spans=spans, passages=[DOC],
                     stats=DecodeStats(), finish_reason="eos")
    assert [s.text for s in res.cited_spans()] == ["2009."]
    assert res.spans == spans  # the paper's metrics count what was copied
    assert [c["text"] for c in res.to_dict()["citations"]] == ["2009."]
    assert dataclasses.replace(res, support=0.0).cited_spans() == []


def test_the_decoder_measures_support_on_the_context_it_showed(tiny_lm):
    # caught: support measured against all passages, or never set
    config = default_config(tiny_lm.name, verify_against="mixture", confidence_offset=1.0,
                            relaxation=1e-6)
    res = NestDecoder(tiny_lm, config).generate(PROMPT, PASSAGES, max_new_tokens=12)
    shown = context(config, PROMPT, PROMPT, PASSAGES).shown
    assert shown
    assert res.support == answer_support(PROMPT, res.text, shown)
    paper = NestDecoder(tiny_lm, dataclasses.replace(config, passages_in_prompt=False))
    assert paper.generate(PROMPT, PASSAGES, max_new_tokens=4).support is None


def test_an_unsupported_answer_becomes_the_focus_sentence_quoted_whole(tiny_lm):
    # caught: the quote ignored, cited in part, streamed before it is decided, or given to
    # a yes/no question
    q = "Who founded the Zephyr Widget Company?"
    free = NestDecoder(tiny_lm, default_config(tiny_lm.name)).generate(q, PASSAGES,
                                                                      max_new_tokens=8)
    shown = context(default_config(tiny_lm.name), q, q, PASSAGES).shown
    assert free.support is not None
    assert free.support < 1.0, free.text  # the random model adds words the sentence lacks
    decoder = NestDecoder(tiny_lm, default_config(tiny_lm.name, quote_below=1.0))
    chunks = list(decoder.stream(q, PASSAGES, max_new_tokens=8))
    assert len(chunks) == 1  # held until decided: nothing of the model's answer streamed
    res = chunks[0].result
    assert res is not None
    assert res.quoted
    assert res.text == shown[0].text == PASSAGES[0].text  # the focus: the one sentence
    (span,) = res.cited_spans()
    assert (span.kind, span.text, span.out_start, span.src_start) == (
        "matched", res.text, 0, 0)
    assert tiny_lm.decode(res.token_ids) == res.text
    assert res.support == 1.0
    assert not free.quoted
    yes_no = "Was the Zephyr Widget Company founded in 1987?"
    assert not decoder.generate(yes_no, PASSAGES, max_new_tokens=8).quoted
    at = default_config(tiny_lm.name, quote_below=0.5)
    ctx = context(at, q, q, PASSAGES)
    assert quote(at, q, 0.5, ctx, PASSAGES) == []  # support at the bound: the answer stays
    assert quote(at, q, 0.49, ctx, PASSAGES) == [(PASSAGES[0], 0, len(PASSAGES[0].text))]


def test_a_citation_ends_on_a_content_word():
    # the demo's "... Tomasz Brecker in[1] 2009": the mark goes after "Brecker"
    out = "It was released in 2009."
    (span,) = citations([cite(out, "released in")], out)
    assert (span.text, span.out_end, span.src_end) == (
        "released", out.index("released") + 8, DOC.text.index("released") + 8)
    assert out[span.out_start:span.out_end] == DOC.text[span.src_start:span.src_end]
