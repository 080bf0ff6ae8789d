"""Show a :class:`~nest_core.types.NestResult` with its attribution: terminal, markdown, HTML.

Every renderer numbers the *cited* passages ``[1], [2], ...`` in order of first use, so the
same answer reads the same way in a terminal, a markdown file and a web page. Two kinds of
citation are kept apart everywhere: a *copied* span (Nest's copy path produced it) carries
``[n]`` and the strong style (bold, filled); a *matched* span (the LM wrote it, and passage
n holds it verbatim: ``NestResult.matches``) carries ``[~n]`` and the light style
(underlined, dashed, italic in markdown). A legend says so whenever an answer has matched
spans. Other text the LM wrote carries no marker. Renderers are pure functions of the
result (no I/O), which keeps them testable without a model.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TextIO

from nest_core.app.safe_text import one_line, printable
from nest_core.types import NestResult, Passage, Span, SpanKind

# One colour per source number (cycled): bright enough on dark and light terminals.
_PALETTE = ("36", "32", "33", "35", "34", "31")
_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_UNDERLINE = "4"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCERPT_CONTEXT = 60  # characters of passage shown around the cited text
LEGEND = ("[n] copied from source n by Nest · [~n] matched: the model wrote it, "
          "source n holds it verbatim")


def marker(number: int, kind: SpanKind) -> str:
    """``[n]`` after a copied span, ``[~n]`` after a matched one."""
    return f"[{number}]" if kind == "copied" else f"[~{number}]"


@dataclass
class Source:
    """A cited passage, its number and the spans of the answer that came from it (copied
    and matched, in output order; each span's ``kind`` says which)."""

    number: int
    passage: Passage
    spans: list[Span] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Title, then the file or URL and the chunk number when the store recorded them
        (two passages of one file must not read as the same source); on one line, control
        characters escaped (:func:`~nest_core.app.safe_text.one_line`): a file name with a
        newline or ESC adds no line and sends no command."""
        meta = self.passage.metadata
        # LlamaIndex's readers record file_path / file_name, not source
        where = [str(w) for w in (meta.get("source") or meta.get("url")
                                  or meta.get("file_path") or meta.get("file_name"),) if w]
        if isinstance(meta.get("chunk"), int):
            where.append(f"passage {meta['chunk'] + 1}")
        title = self.passage.title or self.passage.id
        return one_line(f"{title} ({', '.join(where)})" if where else title)


def number_sources(result: NestResult) -> list[Source]:
    """Cited passages (by copied or matched spans) numbered by first appearance in the
    answer (uncited ones are left out: a number nobody points at would only confuse the
    reader)."""
    by_id: dict[str, Source] = {}
    for span in result.cited_spans():
        src = by_id.get(span.passage.id)
        if src is None:
            src = by_id[span.passage.id] = Source(len(by_id) + 1, span.passage)
        src.spans.append(span)
    return list(by_id.values())


class Segment(NamedTuple):
    """A piece of the answer: cited (``number`` of its source, ``kind`` of citation) or not
    (both ``None``)."""

    text: str
    number: int | None
    kind: SpanKind | None


def segments(result: NestResult, sources: Sequence[Source] | None = None) -> list[Segment]:
    """The answer cut into :class:`Segment` pieces, in output order. Adjacent pieces citing
    the same source are separate segments; renderers mark only the last of such a run."""
    sources = number_sources(result) if sources is None else sources
    number = {s.passage.id: s.number for s in sources}
    pieces: list[Segment] = []
    pos = 0
    for span in result.cited_spans():
        if span.out_start < pos:
            continue  # overlaps the previous citation (never from the decoder): skip
        if span.out_start > pos:
            pieces.append(Segment(result.text[pos:span.out_start], None, None))
        pieces.append(Segment(result.text[span.out_start:span.out_end],
                              number[span.passage.id], span.kind))
        pos = span.out_end
    if pos < len(result.text):
        pieces.append(Segment(result.text[pos:], None, None))
    return pieces


def stats_line(result: NestResult) -> str:
    """One line of speed and attribution numbers (what the demo prints under each answer)."""
    st = result.stats
    parts = [f"{st.prompt_tokens}-token prompt", f"{st.generated_tokens} tokens",
             f"{st.tokens_per_second:.1f} tokens/s",
             f"{st.tokens_per_forward:.2f} tokens/forward",
             f"first text {st.first_token_seconds:.1f} s", f"{st.total_seconds:.1f} s"]
    if result.spans:
        parts.append(f"{result.attribution_ratio:.0%} copied in {len(result.spans)} span(s)")
    else:
        parts.append("nothing copied")
    if result.matches:
        parts.append(f"{len(result.matches)} matched span(s)")
    return " · ".join(parts)


def excerpt(source: Source, context: int = EXCERPT_CONTEXT
            ) -> tuple[str, list[tuple[int, int, SpanKind]]]:
    """The part of the passage around the cited text, and the cited ranges inside it as
    ``(start, end, kind)`` (where a copied and a matched range overlap, copied wins)."""
    text = source.passage.text
    ranges = sorted((s.src_start, s.src_end) for s in source.spans)
    start = max(0, ranges[0][0] - context)
    end = min(max(b for _, b in ranges) + context, len(text))
    # widen to word boundaries so the excerpt never starts or ends mid-word
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    prefix = "…" if start > 0 else ""
    suffix = "…" if end < len(text) else ""
    shift = len(prefix) - start
    marks = [(a + shift, b + shift, kind) for a, b, kind in _kind_runs(source.spans)]
    return prefix + text[start:end] + suffix, marks


def _kind_runs(spans: Sequence[Span]) -> list[tuple[int, int, SpanKind]]:
    """Source ranges of ``spans`` merged into runs of one kind, copied over matched."""
    if not spans:
        return []
    lo = min(s.src_start for s in spans)
    strength = [0] * (max(s.src_end for s in spans) - lo)  # 0 none, 1 matched, 2 copied
    for s in spans:
        level = 2 if s.kind == "copied" else 1
        for i in range(s.src_start - lo, s.src_end - lo):
            strength[i] = max(strength[i], level)
    runs: list[tuple[int, int, SpanKind]] = []
    for i, level in enumerate(strength):
        if not level:
            continue
        kind: SpanKind = "copied" if level == 2 else "matched"
        if runs and runs[-1][1] == lo + i and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], lo + i + 1, kind)
        else:
            runs.append((lo + i, lo + i + 1, kind))
    return runs


# --- terminal --------------------------------------------------------------------------------
def use_color(stream: TextIO | None) -> bool:
    """Colour only for a terminal, and never when ``NO_COLOR`` is set (no-color.org);
    ``FORCE_COLOR`` turns it on for pipes (CI logs, tests)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def render_terminal(result: NestResult, *, color: bool = False, width: int = 88,
                    show_sources: bool = True) -> str:
    """The answer wrapped to ``width`` with each cited span coloured by its source (bold
    when copied, underlined when matched) and followed by ``[n]`` or ``[~n]``, then the
    numbered sources with the cited text marked (and the legend, when anything matched).

    Without colour the ``[n]``/``[~n]`` markers alone carry the attribution, so piped output
    and ``NO_COLOR`` terminals lose nothing but the highlight.
    """
    sources = number_sources(result)
    lines = _wrap(_answer_words(result, color), width)
    if show_sources and sources:
        lines += _sources_block(result, sources, color, width)
    return "\n".join(lines)


def _sources_block(result: NestResult, sources: Sequence[Source], color: bool,
                   width: int) -> list[str]:
    lines = ["", _style("Sources", _BOLD, color)]
    for src in sources:
        lines += _source_lines(src, color, width)
    if result.matches:
        lines += _wrap(_words([(LEGEND, _DIM if color else "", "", "")]), width)
    return lines


def render_comparison(base: NestResult, nest: NestResult, *, color: bool = False,
                      width: int = 100, labels: tuple[str, str] = ("Plain model", "Nest")
                      ) -> str:
    """Plain model and Nest side by side (stacked when ``width`` is too narrow for two
    readable columns), each with its stats line, then Nest's numbered sources."""
    two_columns = width >= 90
    col = (width - 3) // 2 if two_columns else width
    panels = []
    for label, result in zip(labels, (base, nest), strict=True):
        stats = _words([(stats_line(result), _DIM if color else "", "", "")])
        panels.append([_style(label, _BOLD, color), *_wrap(_answer_words(result, color), col),
                       "", *_wrap(stats, col)])
    lines: list[str] = []
    if two_columns:
        left, right = panels
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"{_pad(a, col)} │ {b}".rstrip())
    else:
        for panel in panels:
            lines += [*panel, ""]
    sources = number_sources(nest)
    if sources:
        lines += _sources_block(nest, sources, color, width)
    return "\n".join(lines).rstrip()


_NEWLINE = ("\n", -1)
_Word = tuple[str, int]  # (text with ANSI codes, visible width); _NEWLINE forces a break
_Piece = tuple[str, str, str, str]  # (text, style, marker after it, marker style)


def _words(pieces: Sequence[_Piece]) -> list[_Word]:
    """Split styled pieces into words. A word may span pieces ("Halvorsen" copied, "." not),
    so a marker lands right after the cited text: ``Halvorsen[1].``. Text from documents
    and answers passes through :func:`printable` here, before any colour code is added."""
    words: list[_Word] = []
    cur: list[str] = []
    width = 0
    for text, style, marker, marker_style in pieces:
        for tok in re.split(r"(\s)", printable(text)):
            if tok and not tok.isspace():
                cur.append(f"{style}{tok}{_RESET}" if style else tok)
                width += len(tok)
                continue
            if tok and cur:
                words.append(("".join(cur), width))
                cur, width = [], 0
            if tok == "\n":
                words.append(_NEWLINE)
        if marker:
            cur.append(f"{marker_style}{marker}{_RESET}" if marker_style else marker)
            width += len(marker)
    if cur:
        words.append(("".join(cur), width))
    return words


def _wrap(words: Sequence[_Word], width: int) -> list[str]:
    """Greedy word wrap measuring visible width only; blank lines collapse to one."""
    lines: list[str] = []
    cur: list[str] = []
    used = 0
    for word in words:
        if word == _NEWLINE or (cur and used + 1 + word[1] > width):
            if cur or (lines and lines[-1]):
                lines.append(" ".join(cur))
            cur, used = [], 0
            if word == _NEWLINE:
                continue
        cur.append(word[0])
        used += word[1] + (1 if len(cur) > 1 else 0)
    if cur:
        lines.append(" ".join(cur))
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _answer_words(result: NestResult, color: bool) -> list[_Word]:
    pieces: list[_Piece] = []
    segs = segments(result)
    for i, (text, number, kind) in enumerate(segs):
        if number is None or kind is None:
            pieces.append((text, "", "", ""))
            continue
        style = _color_of(number, kind) if color else ""
        # "Hal" matched + "vorsen Orchard" copied from one source: one marker, at the end
        same_next = i + 1 < len(segs) and segs[i + 1].number == number
        pieces.append((text, style, "" if same_next else marker(number, kind),
                       _DIM if color else ""))
    return _words(pieces)


def _source_lines(src: Source, color: bool, width: int) -> list[str]:
    text, marks = excerpt(src)
    text = re.sub(r"\s", " ", text)  # one paragraph: same length, so marks stay valid
    pieces: list[_Piece] = []
    pos = 0
    for a, b, kind in marks:
        style = _color_of(src.number, kind) if color else ""
        pieces += [(text[pos:a], "", "", ""), (text[a:b], style, "", "")]
        pos = b
    pieces.append((text[pos:], "", "", ""))
    indent = "    "
    body = [indent + line for line in _wrap(_words(pieces), max(20, width - len(indent)))]
    head = _color_of(src.number) if color else ""
    return [_style(f"[{src.number}] {src.label}", head, color), *body]


def _style(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color and code else text


def _color_of(number: int, kind: SpanKind = "copied") -> str:
    """The source's colour: bold for copied text, underlined for matched text."""
    weight = "1" if kind == "copied" else _UNDERLINE
    return f"\x1b[{weight};{_PALETTE[(number - 1) % len(_PALETTE)]}m"


def _pad(text: str, width: int) -> str:
    visible = len(_ANSI.sub("", text))
    return text + " " * max(0, width - visible)


# --- markdown --------------------------------------------------------------------------------
def render_markdown(result: NestResult, *, question: str | None = None) -> str:
    """Markdown with each copied span in bold followed by ``[n]``, each matched span in
    italics followed by ``[~n]``, and a numbered list of sources quoting the cited text
    (for notes, issues, chat tools)."""
    sources = number_sources(result)
    out = [f"**Q:** {_md_escape(question)}\n"] if question else []
    body = []
    for text, number, kind in segments(result, sources):
        if number is None or kind is None:
            body.append(_md_escape(text))
            continue
        lead = text[: len(text) - len(text.lstrip())]
        core = text.strip()
        emphasis = "**" if kind == "copied" else "*"
        body.append(f"{lead}{emphasis}{_md_escape(core)}{emphasis}{marker(number, kind)}"
                    if core else text)
    out.append("".join(body).strip())
    if sources:
        out.append("\n**Sources**\n")
        for src in sources:
            out.append(f"{src.number}. {_md_escape(src.label)}: {_md_quotes(src.spans)}")
        if result.matches:
            out.append(f"\n{_md_escape(LEGEND)}")
    return "\n".join(out) + "\n"


def _md_quotes(spans: Sequence[Span]) -> str:
    """``“copied”; “copied” · matched: “matched”; ...`` (either part only when present)."""
    quote = "; ".join
    copied = quote(f"“{_md_escape(s.text)}”" for s in spans if s.kind == "copied")
    matched = quote(f"“{_md_escape(s.text)}”" for s in spans if s.kind == "matched")
    return " · ".join([*([copied] if copied else []),
                       *([f"matched: {matched}"] if matched else [])])


def _md_escape(text: str) -> str:
    """Escape the characters that would turn copied text into markup (emphasis, links)."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


# --- HTML ------------------------------------------------------------------------------------
_CSS = """
body{font:16px/1.55 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;
color:#1d1d1f}
h1{font-size:1.3rem} .q{color:#555} .answer{font-size:1.1rem;white-space:pre-wrap}
a.span{color:inherit;text-decoration:none;border-bottom:2px solid;padding:0 1px}
a.span:hover{background:#fff3b0} sup{font-size:.7em;margin-left:1px}
.s1{border-color:#0891b2;background:#ecfeff}.s2{border-color:#16a34a;background:#f0fdf4}
.s3{border-color:#ca8a04;background:#fefce8}.s4{border-color:#c026d3;background:#fdf4ff}
.s5{border-color:#2563eb;background:#eff6ff}.s0{border-color:#dc2626;background:#fef2f2}
.stats{color:#666;font-size:.85rem} .plain{color:#444;white-space:pre-wrap}
ol.sources li{margin:.8rem 0} ol.sources li:target{background:#fff3b0}
blockquote{margin:.3rem 0 0;padding-left:.8rem;border-left:3px solid #ddd;color:#333}
mark{background:#fde68a}
a.span.matched{border-bottom-style:dashed;background:none}
mark.matched{background:none;border-bottom:2px dashed #ca8a04}
.legend{color:#555;font-size:.85rem}
"""


def render_html(result: NestResult, *, question: str | None = None,
                baseline: NestResult | None = None, title: str = "Nest answer") -> str:
    """A small self-contained page (inline CSS, no scripts, no external requests): each
    cited span links to its numbered passage below, where the cited text is marked.
    Copied spans are filled and marked ``[n]``; matched spans (class ``matched``) are
    dashed and marked ``[~n]``, with a legend. ``baseline`` adds the plain model's answer
    for comparison. All text is HTML-escaped."""
    esc = html.escape
    sources = number_sources(result)
    parts = [f'<a class="{_span_class(n, kind)}" href="#src-{n}" '
             f'title="{esc(_src_title(sources, n))}">'
             f"{esc(text)}<sup>{marker(n, kind)}</sup></a>" if n and kind else esc(text)
             for text, n, kind in segments(result, sources)]
    doc = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{esc(title)}</h1>"]
    if question:
        doc.append(f'<p class="q">Question: {esc(question)}</p>')
    if baseline is not None:
        doc += ["<h2>Plain model</h2>", f'<p class="plain">{esc(baseline.text.strip())}</p>',
                f'<p class="stats">{esc(stats_line(baseline))}</p>', "<h2>Nest</h2>"]
    doc += [f'<p class="answer">{"".join(parts).strip()}</p>',
            f'<p class="stats">{esc(stats_line(result))}</p>']
    if sources:
        doc.append('<h2>Sources</h2><ol class="sources">')
        for src in sources:
            doc.append(f'<li id="src-{src.number}" data-passage-id="{esc(src.passage.id)}">'
                       f"<strong>{esc(src.label)}</strong>"
                       f"<blockquote>{_marked(src.passage.text, src.spans)}</blockquote></li>")
        doc.append("</ol>")
        if result.matches:
            doc.append('<p class="legend"><a class="span s1">copied</a><sup>[n]</sup> from '
                       'source n by Nest · <a class="span matched s1">matched</a>'
                       "<sup>[~n]</sup>: the model wrote it, source n holds it verbatim</p>")
    doc.append("</body></html>")
    return "\n".join(doc) + "\n"


def _src_title(sources: Sequence[Source], number: int) -> str:
    return sources[number - 1].label


def _span_class(number: int, kind: SpanKind) -> str:
    return f"span s{number % 6}" if kind == "copied" else f"span matched s{number % 6}"


def _marked(text: str, spans: Sequence[Span]) -> str:
    out, pos = [], 0
    for a, b, kind in _kind_runs(spans):
        tag = "<mark>" if kind == "copied" else '<mark class="matched">'
        out += [html.escape(text[pos:a]), f"{tag}{html.escape(text[a:b])}</mark>"]
        pos = b
    out.append(html.escape(text[pos:]))
    return "".join(out)
