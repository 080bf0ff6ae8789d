"""Show a :class:`~nest_core.types.NestResult` with its attribution: terminal, markdown, HTML.

Every renderer numbers the *cited* passages ``[1], [2], ...`` in order of first use, so the
same answer reads the same way in a terminal, a markdown file and a web page. Copied spans
carry the number of their passage; text the LM wrote itself carries none. Renderers are
pure functions of the result (no I/O), which keeps them testable without a model.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from nest_core.types import NestResult, Passage, Span

# One colour per source number (cycled): bright enough on dark and light terminals.
_PALETTE = ("36", "32", "33", "35", "34", "31")
_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCERPT_CONTEXT = 60  # characters of passage shown around the copied text


@dataclass
class Source:
    """A cited passage, its number and the spans of the answer that came from it."""

    number: int
    passage: Passage
    spans: list[Span] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Title, then the file or URL and the chunk number when the store recorded them
        (two passages of one file must not read as the same source)."""
        meta = self.passage.metadata
        where = [str(w) for w in (meta.get("source") or meta.get("url"),) if w]
        if isinstance(meta.get("chunk"), int):
            where.append(f"passage {meta['chunk'] + 1}")
        title = self.passage.title or self.passage.id
        return f"{title} ({', '.join(where)})" if where else title


def number_sources(result: NestResult) -> list[Source]:
    """Cited passages numbered by first appearance in the answer (uncited ones are left out:
    a number nobody points at would only confuse the reader)."""
    by_id: dict[str, Source] = {}
    for span in sorted(result.spans, key=lambda s: s.out_start):
        src = by_id.get(span.passage.id)
        if src is None:
            src = by_id[span.passage.id] = Source(len(by_id) + 1, span.passage)
        src.spans.append(span)
    return list(by_id.values())


def segments(result: NestResult, sources: Sequence[Source] | None = None
             ) -> list[tuple[str, int | None]]:
    """The answer cut into ``(text, source number or None)`` pieces, in output order."""
    sources = number_sources(result) if sources is None else sources
    number = {s.passage.id: s.number for s in sources}
    pieces: list[tuple[str, int | None]] = []
    pos = 0
    for span in sorted(result.spans, key=lambda s: s.out_start):
        if span.out_start > pos:
            pieces.append((result.text[pos:span.out_start], None))
        pieces.append((result.text[span.out_start:span.out_end], number[span.passage.id]))
        pos = span.out_end
    if pos < len(result.text):
        pieces.append((result.text[pos:], None))
    return pieces


def stats_line(result: NestResult) -> str:
    """One line of speed and attribution numbers (what the demo prints under each answer)."""
    st = result.stats
    parts = [f"{st.prompt_tokens}-token prompt", f"{st.generated_tokens} tokens",
             f"{st.tokens_per_second:.1f} tokens/s",
             f"{st.tokens_per_forward:.2f} tokens/forward", f"{st.total_seconds:.1f} s"]
    if result.spans:
        parts.append(f"{result.attribution_ratio:.0%} copied in {len(result.spans)} span(s)")
    else:
        parts.append("nothing copied")
    return " · ".join(parts)


def excerpt(source: Source, context: int = EXCERPT_CONTEXT) -> tuple[str, list[tuple[int, int]]]:
    """The part of the passage around the copied text, and the copied ranges inside it."""
    text = source.passage.text
    ranges = sorted((s.src_start, s.src_end) for s in source.spans)
    start = max(0, ranges[0][0] - context)
    end = min(len(text), ranges[-1][1] + context)
    # widen to word boundaries so the excerpt never starts or ends mid-word
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    while end < len(text) and not text[end].isspace():
        end += 1
    prefix = "…" if start > 0 else ""
    suffix = "…" if end < len(text) else ""
    shift = len(prefix) - start
    marks = [(a + shift, b + shift) for a, b in _merge(ranges)]
    return prefix + text[start:end] + suffix, marks


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
    """The answer wrapped to ``width`` with each copied span coloured by its source and
    followed by ``[n]``, then the numbered sources with the copied text marked.

    Without colour the ``[n]`` markers alone carry the attribution, so piped output and
    ``NO_COLOR`` terminals lose nothing but the highlight.
    """
    sources = number_sources(result)
    lines = _wrap(_answer_words(result, color), width)
    if show_sources and sources:
        lines += ["", _style("Sources", _BOLD, color)]
        for src in sources:
            lines += _source_lines(src, color, width)
    return "\n".join(lines)


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
        lines += ["", _style("Sources", _BOLD, color)]
        for src in sources:
            lines += _source_lines(src, color, width)
    return "\n".join(lines).rstrip()


_NEWLINE = ("\n", -1)
_Word = tuple[str, int]  # (text with ANSI codes, visible width); _NEWLINE forces a break
_Piece = tuple[str, str, str, str]  # (text, style, marker after it, marker style)


def _words(pieces: Sequence[_Piece]) -> list[_Word]:
    """Split styled pieces into words. A word may span pieces ("Halvorsen" copied, "." not),
    so a marker lands right after the copied text: ``Halvorsen[1].``."""
    words: list[_Word] = []
    cur: list[str] = []
    width = 0
    for text, style, marker, marker_style in pieces:
        for tok in re.split(r"(\s)", text):
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
    for text, number in segments(result):
        if number is None:
            pieces.append((text, "", "", ""))
        else:
            style = _color_of(number) if color else ""
            pieces.append((text, style, f"[{number}]", _DIM if color else ""))
    return _words(pieces)


def _source_lines(src: Source, color: bool, width: int) -> list[str]:
    text, marks = excerpt(src)
    text = re.sub(r"\s", " ", text)  # one paragraph: same length, so marks stay valid
    style = _color_of(src.number) if color else ""
    pieces: list[_Piece] = []
    pos = 0
    for a, b in marks:
        pieces += [(text[pos:a], "", "", ""), (text[a:b], style, "", "")]
        pos = b
    pieces.append((text[pos:], "", "", ""))
    indent = "    "
    body = [indent + line for line in _wrap(_words(pieces), max(20, width - len(indent)))]
    return [_style(f"[{src.number}] {src.label}", style, color), *body]


def _style(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color and code else text


def _color_of(number: int) -> str:
    return f"\x1b[1;{_PALETTE[(number - 1) % len(_PALETTE)]}m"


def _pad(text: str, width: int) -> str:
    visible = len(_ANSI.sub("", text))
    return text + " " * max(0, width - visible)


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# --- markdown --------------------------------------------------------------------------------
def render_markdown(result: NestResult, *, question: str | None = None) -> str:
    """Markdown with each copied span in bold and followed by ``[n]``, and a numbered list of
    sources quoting the copied text (for notes, issues, chat tools)."""
    sources = number_sources(result)
    out = [f"**Q:** {_md_escape(question)}\n"] if question else []
    body = []
    for text, number in segments(result, sources):
        if number is None:
            body.append(_md_escape(text))
            continue
        lead = text[: len(text) - len(text.lstrip())]
        core = text.strip()
        body.append(f"{lead}**{_md_escape(core)}**[{number}]" if core else text)
    out.append("".join(body).strip())
    if sources:
        out.append("\n**Sources**\n")
        for src in sources:
            quotes = "; ".join(f"“{_md_escape(s.text)}”" for s in src.spans)
            out.append(f"{src.number}. {_md_escape(src.label)}: {quotes}")
    return "\n".join(out) + "\n"


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
"""


def render_html(result: NestResult, *, question: str | None = None,
                baseline: NestResult | None = None, title: str = "Nest answer") -> str:
    """A small self-contained page (inline CSS, no scripts, no external requests): each
    copied span links to its numbered passage below, where the copied text is marked.
    ``baseline`` adds the plain model's answer for comparison. All text is HTML-escaped."""
    esc = html.escape
    sources = number_sources(result)
    parts = [f'<a class="span s{n % 6}" href="#src-{n}" title="{esc(_src_title(sources, n))}"'
             f">{esc(text)}<sup>[{n}]</sup></a>" if n else esc(text)
             for text, n in segments(result, sources)]
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
    doc.append("</body></html>")
    return "\n".join(doc) + "\n"


def _src_title(sources: Sequence[Source], number: int) -> str:
    return sources[number - 1].label


def _marked(text: str, spans: Sequence[Span]) -> str:
    out, pos = [], 0
    for a, b in _merge([(s.src_start, s.src_end) for s in spans]):
        out += [html.escape(text[pos:a]), f"<mark>{html.escape(text[a:b])}</mark>"]
        pos = b
    out.append(html.escape(text[pos:]))
    return "".join(out)
