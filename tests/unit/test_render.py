"""Renderers on hand-made results: numbering, highlighting, wrapping, escaping.

Results are built from the real dataclasses with spans that satisfy the Span invariant
(``text == output[out_start:out_end] == passage.text[src_start:src_end]``), so the renderers
see exactly what the decoder would give them, without loading a model.
"""

from __future__ import annotations

import dataclasses
import io
import re
from html.parser import HTMLParser

import pytest

from nest_core.app.render import (
    LEGEND,
    Source,
    excerpt,
    number_sources,
    render_comparison,
    render_html,
    render_markdown,
    render_terminal,
    segments,
    stats_line,
    use_color,
)
from nest_core.types import DecodeStats, NestResult, Passage, Span

ANSI = re.compile(r"\x1b\[[0-9;]*m")

HISTORY = Passage(id="welcome#0", title="Welcome", metadata={"source": "data/welcome.md"},
                  text="Halvorsen Orchard Robotics was founded in 2009 by Odile Halvorsen "
                       "and Tomasz Brecker in Dunmore, Pennsylvania.")
LEAVE = Passage(id="leave#0", title="Time off",
                text="Every employee receives 27 days of paid leave per year.")
EVIL = Passage(id="evil#0", title="<script>alert(1)</script> & co",
               text='Use <b>bold</b> & "quotes" *here* [x](y).')


def _span(output: str, piece: str, passage: Passage, token_start: int, after: int) -> Span:
    out_start = output.index(piece, after)
    src_start = passage.text.index(piece)
    return Span(text=piece, out_start=out_start, out_end=out_start + len(piece),
                passage=passage, src_start=src_start, src_end=src_start + len(piece),
                token_start=token_start, token_end=token_start + len(piece.split()))


def _result(text: str, pieces: list[tuple[str, Passage]]) -> NestResult:
    spans: list[Span] = []
    for i, (piece, p) in enumerate(pieces):
        spans.append(_span(text, piece, p, i * 10, spans[-1].out_end if spans else 0))
    stats = DecodeStats(generated_tokens=40, lm_forwards=10, total_seconds=2.0)
    return NestResult(text=text, token_ids=list(range(40)), spans=spans,
                      passages=[HISTORY, LEAVE, EVIL], stats=stats, finish_reason="length")


@pytest.fixture
def result() -> NestResult:
    text = ("It was founded in 2009 by Odile Halvorsen. Staff get 27 days of paid leave, "
            "and the company was founded in 2009 by Odile Halvorsen again.")
    return _result(text, [("founded in 2009 by Odile Halvorsen", HISTORY),
                          ("27 days of paid leave", LEAVE),
                          ("founded in 2009 by Odile Halvorsen", HISTORY)])


def test_sources_are_numbered_by_first_use_and_grouped(result: NestResult) -> None:
    sources = number_sources(result)
    assert [(s.number, s.passage.id, len(s.spans)) for s in sources] == [
        (1, "welcome#0", 2), (2, "leave#0", 1)]
    assert sources[0].label == "Welcome (data/welcome.md)"
    assert sources[1].label == "Time off"


def test_segments_rebuild_the_text_and_number_only_copies(result: NestResult) -> None:
    pieces = segments(result)
    assert "".join(text for text, _, _ in pieces) == result.text
    copied = [(text, n, kind) for text, n, kind in pieces if n is not None]
    assert copied == [("founded in 2009 by Odile Halvorsen", 1, "copied"),
                      ("27 days of paid leave", 2, "copied"),
                      ("founded in 2009 by Odile Halvorsen", 1, "copied")]
    assert all(kind is None for _, n, kind in pieces if n is None)


def test_terminal_plain_puts_markers_after_spans_and_lists_sources(result: NestResult) -> None:
    out = render_terminal(result, color=False, width=200)
    assert not ANSI.search(out)
    first_line = out.splitlines()[0]
    assert first_line.startswith("It was founded in 2009 by Odile Halvorsen[1]. Staff get "
                                 "27 days of paid leave[2], and")
    assert "\nSources\n[1] Welcome (data/welcome.md)\n" in out
    assert "[2] Time off" in out


def test_terminal_colour_is_only_decoration(result: NestResult) -> None:
    plain = render_terminal(result, color=False, width=60)
    coloured = render_terminal(result, color=True, width=60)
    assert ANSI.search(coloured)
    assert ANSI.sub("", coloured) == plain


@pytest.mark.parametrize("width", [30, 50, 80])
def test_terminal_lines_fit_the_width(result: NestResult, width: int) -> None:
    for line in render_terminal(result, color=True, width=width).splitlines():
        assert len(ANSI.sub("", line)) <= width, line


def test_uncopied_answer_has_no_sources() -> None:
    res = _result("I do not know.", [])
    assert render_terminal(res) == "I do not know."
    assert "nothing copied" in stats_line(res)
    assert "Sources" not in render_markdown(res)


def test_use_color_respects_no_color_force_color_and_pipes(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert use_color(Tty()) is True
    assert use_color(io.StringIO()) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(Tty()) is False
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert use_color(io.StringIO()) is True


def test_comparison_two_columns_then_stacked(result: NestResult) -> None:
    base = _result("It was founded by a Danish engineer.", [])
    wide = render_comparison(base, result, color=True, width=100)
    lines = wide.splitlines()
    assert lines[0].startswith("\x1b[1mPlain model")
    assert all(len(ANSI.sub("", line)) <= 100 for line in lines)
    assert " │ " in ANSI.sub("", lines[1])
    narrow = ANSI.sub("", render_comparison(base, result, color=True, width=60))
    assert "│" not in narrow
    assert narrow.index("Plain model") < narrow.index("Nest\n") < narrow.index("Sources")


def test_excerpt_marks_the_copied_text() -> None:
    res = _result("Staff get 27 days of paid leave.", [("27 days of paid leave", LEAVE)])
    text, marks = excerpt(number_sources(res)[0], context=3)
    assert [(text[a:b], kind) for a, b, kind in marks] == [("27 days of paid leave", "copied")]
    assert text.startswith("…")
    assert text.endswith("…")


def test_markdown_bolds_spans_cites_and_escapes() -> None:
    res = _result('Write "quotes" *here* [x](y) now.', [('"quotes" *here* [x](y)', EVIL)])
    md = render_markdown(res, question="What *is* it?")
    assert md.startswith("**Q:** What \\*is\\* it?")
    assert '**"quotes" \\*here\\* \\[x\\](y)**[1]' in md
    assert "1. \\<script\\>alert(1)\\</script\\> & co:" in md


class _Collector(HTMLParser):
    """Collects hrefs, ids, visible text and any <script> tag of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        if found.get("href"):
            self.hrefs.append(str(found["href"]))
        if found.get("id"):
            self.ids.add(str(found["id"]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_links_every_span_to_its_passage_and_escapes() -> None:
    res = _result('Write <i>this</i> & "quotes" *here* [x](y) now.',
                  [('"quotes" *here* [x](y)', EVIL)])
    page = render_html(res, question="<b>why</b>?", baseline=_result("No idea <3", []))
    parser = _Collector()
    parser.feed(page)
    assert "script" not in parser.tags
    assert "i" not in parser.tags
    assert parser.hrefs == ["#src-1"]
    assert {"src-1"} <= parser.ids
    text = "".join(parser.text)
    assert "Question: <b>why</b>?" in text
    assert 'Write <i>this</i> & "quotes" *here* [x](y)[1] now.' in text
    assert "<script>alert(1)</script> & co" in text
    assert "No idea <3" in text
    assert "<mark>&quot;quotes&quot; *here* [x](y)</mark>" in page


# --- matched spans: kept apart from copied ones on every surface ---------------------------
MATCHED_TEXT = ("Staff get 27 days of paid leave. It was founded in 2009 in Dunmore, "
                "Pennsylvania by Odile Halvorsen.")


@pytest.fixture
def mixed() -> NestResult:
    """Copied "27 days of paid leave" [LEAVE]; matched "was founded in 2009", "in Dunmore,
    Pennsylvania" and "by Odile Halvorsen" [HISTORY], found by match_spans."""
    from nest_core.matching import match_spans

    res = _result(MATCHED_TEXT, [("27 days of paid leave", LEAVE)])
    found = match_spans(res.text, [HISTORY, LEAVE], res.spans)
    return dataclasses.replace(res, matches=found)


def test_matched_spans_are_numbered_with_copied_ones_and_keep_their_kind(mixed: NestResult
                                                                         ) -> None:
    assert [(m.text, m.passage.id) for m in mixed.matches] == [
        ("was founded in 2009", "welcome#0"), ("in Dunmore, Pennsylvania", "welcome#0"),
        ("by Odile Halvorsen", "welcome#0")]
    sources = number_sources(mixed)
    assert [(s.number, s.passage.id, [sp.kind for sp in s.spans]) for s in sources] == [
        (1, "leave#0", ["copied"]), (2, "welcome#0", ["matched", "matched", "matched"])]
    cited = [(text, n, kind) for text, n, kind in segments(mixed) if n is not None]
    assert cited == [("27 days of paid leave", 1, "copied"),
                     ("was founded in 2009", 2, "matched"),
                     ("in Dunmore, Pennsylvania", 2, "matched"),
                     ("by Odile Halvorsen", 2, "matched")]
    assert "".join(p.text for p in segments(mixed)) == mixed.text
    assert stats_line(mixed).endswith("copied in 1 span(s) · 3 matched span(s)")


def test_terminal_marks_matched_text_apart_and_explains_it(mixed: NestResult,
                                                           result: NestResult) -> None:
    out = render_terminal(mixed, color=False, width=200)
    assert out.splitlines()[0] == (
        "Staff get 27 days of paid leave[1]. It was founded in 2009[~2] in Dunmore, "
        "Pennsylvania[~2] by Odile Halvorsen[~2].")
    assert out.endswith(LEGEND)
    assert "\nSources\n[1] Time off\n" in out
    assert LEGEND not in render_terminal(result, color=False, width=200)  # nothing matched
    coloured = render_terminal(mixed, color=True, width=200)
    assert ANSI.sub("", coloured) == out
    assert "\x1b[1;36m27\x1b[0m" in coloured  # copied: bold, colour of source 1
    assert "\x1b[4;32mDunmore,\x1b[0m" in coloured  # matched: underlined, colour of 2


def test_excerpt_gives_copied_precedence_over_matched() -> None:
    text = "Staff get 27 days of paid leave. Again: days of paid leave per year."
    res = _result(text, [("27 days of paid leave", LEAVE)])
    at = text.index("days of paid leave per year")
    over = Span(text="days of paid leave per year", out_start=at, out_end=at + 27,
                passage=LEAVE, src_start=LEAVE.text.index("days"),
                src_end=LEAVE.text.index("."), token_start=0, token_end=0, kind="matched")
    res = dataclasses.replace(res, matches=[over])
    text, marks = excerpt(number_sources(res)[0], context=100)
    assert [(text[a:b], kind) for a, b, kind in marks] == [
        ("27 days of paid leave", "copied"), (" per year", "matched")]


def test_markdown_italicises_matched_text_and_quotes_it_apart(mixed: NestResult) -> None:
    md = render_markdown(mixed)
    assert md.startswith("Staff get **27 days of paid leave**[1]. It *was founded in 2009*[~2]"
                         " *in Dunmore, Pennsylvania*[~2] *by Odile Halvorsen*[~2].")
    assert "1. Time off: “27 days of paid leave”\n" in md
    assert ("2. Welcome (data/welcome.md): matched: “was founded in 2009”; "
            "“in Dunmore, Pennsylvania”; “by Odile Halvorsen”\n") in md
    assert md.rstrip().endswith("source n holds it verbatim")


def test_html_styles_matched_spans_apart_with_a_legend(mixed: NestResult,
                                                       result: NestResult) -> None:
    page = render_html(mixed)
    parser = _Collector()
    parser.feed(page)
    assert parser.hrefs == ["#src-1", "#src-2", "#src-2", "#src-2"]
    text = "".join(parser.text)
    assert "27 days of paid leave[1]. It was founded in 2009[~2] in" in text
    assert ('<a class="span matched s2" href="#src-2" title="Welcome (data/welcome.md)">'
            "was founded in 2009<sup>[~2]</sup></a>") in page
    assert '<a class="span s1" href="#src-1"' in page
    assert '<mark class="matched">was founded in 2009</mark>' in page
    assert "<mark>27 days of paid leave</mark>" in page
    assert 'class="legend"' in page
    assert 'class="legend"' not in render_html(result)


@pytest.mark.parametrize("color", [False, True])
def test_terminal_output_never_carries_a_documents_control_characters(color: bool) -> None:
    # caught: document text sent to the terminal as is (an OSC title, a clear screen)
    evil = Passage(id="esc#0", title="T\x1b]0;pwned\x07itle",
                   text="Clear \x1b[2J the screen\r and \x9b31m ring \x07 the bell.")
    text = "Clear \x1b[2J the screen\r and \x9b31m ring"
    res = _result(text, [(text, evil)])
    shown = render_terminal(res, color=color) + render_comparison(res, res, color=color)
    assert not _CONTROL_CHARS.search(ANSI.sub("", shown))
    assert "\ufffd[2J the screen" in ANSI.sub("", shown)  # visible, not executed
    assert "pwned" in shown  # the title's text stays, its escape does not


_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def test_adjacent_citations_of_one_source_get_one_marker() -> None:
    # caught: a marker inside a word ("Hal[~1]vorsen") where two spans of one source meet
    text = "It was founded in 2009 by Odile Halvorsen."
    head = _span(text, "founded in 2009 by Odile Hal", HISTORY, 2, 0)
    tail = dataclasses.replace(_span(text, "vorsen", HISTORY, 0, head.out_end),
                               token_start=0, token_end=0, kind="matched")
    tail = dataclasses.replace(tail, src_start=head.src_end, src_end=head.src_end + 6)
    res = NestResult(text=text, token_ids=list(range(12)), spans=[head], matches=[tail],
                     passages=[HISTORY], stats=DecodeStats(), finish_reason="eos")
    shown = render_terminal(res, show_sources=False)
    assert shown == "It was founded in 2009 by Odile Halvorsen[~1]."


def test_function_words_and_marks_get_no_citation_mark() -> None:
    # the demo showed "founded[1] by ... in[1] 2009.[1]": only content is marked now
    text = "It was founded by them in 2009."
    res = _result(text, [("founded", HISTORY), ("by", HISTORY), ("in", HISTORY),
                         ("2009", HISTORY), (".", LEAVE)])
    shown = render_terminal(res, show_sources=False)
    assert shown == "It was founded[1] by them in 2009[1]."
    assert "in[1]" not in render_markdown(res)


def test_a_llama_index_node_is_labelled_by_its_file_not_its_uuid() -> None:
    node = Passage(id="0b4f5c1e-uuid", text="x", metadata={"file_path": "/docs/02-offices.md",
                                                           "file_name": "02-offices.md"})
    named = Passage(id="0b4f5c1e-uuid", text="x", metadata={"file_name": "02-offices.md"})
    assert Source(1, node).label == "0b4f5c1e-uuid (/docs/02-offices.md)"
    assert Source(1, named).label == "0b4f5c1e-uuid (02-offices.md)"
