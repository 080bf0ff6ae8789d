"""Which spans are citations: one rule for every surface (beyond the paper).

The copy path and the matcher find where the answer's text came from, down to single
tokens; not every such stretch says anything about the answer. A made-up number built from
one-character copies ("1" "." "4" "2" "4"), a copied "in" or "." or the first half of a word
look grounded without being so. A span is shown as a citation (library result, streamed
chunks, LangChain, LlamaIndex, server, MCP, CLI) only when:

1. **It carries content:** at least :data:`MIN_CHARS` non-space characters, and a word that
   is not a stop word (:data:`nest_core.focus.STOP_WORDS`): "2009", "Ghent", "apt-get
   install"; not "in", "of the", ".".
2. **It is whole words** (and ends on a content word: a trailing "in" or "of the" is left
   out of the mark): it neither starts nor ends inside a word of the output, so "Sid"
   of "Siduction" is no citation. Spans from one passage that follow each other in the
   output as they follow each other in the passage (the text between them the same in
   both) are judged as one stretch and shown as one citation: a copied "48." after the LM's
   own "0" cites "048." whole (a ``matched`` one when it mixes kinds: verbatim, not all
   copied), and a copied "in" before a matched "2009" is one "in 2009", never "in[1]".
3. **The answer is supported:** when the decoder knows what context it showed the LM, an
   answer most of whose new words that context does not hold (:func:`answer_support` below
   :data:`MIN_SUPPORT`) cites nothing, so a wrong answer is not decorated with the marks of
   the words it happens to share with a passage.

``NestResult.spans`` and ``matches`` stay what the decoder found (the paper's metrics count
them); ``NestResult.cited_spans()`` is this rule applied to them, and :func:`is_citation`
is the rule for one stretch, for the streaming surfaces that close spans as they go.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nest_core.focus import STOP_WORDS
from nest_core.types import Span

MIN_CHARS = 3  # non-space characters: "in", "1." or "." alone cite nothing
# Share of the answer's new content words the shown context must hold for any citation
# (handbook dev, shipped default: >= 0.25 keeps the citations of 26 of 27 right answers and
# drops those of 33 of 75 wrong ones).
MIN_SUPPORT = 0.25

_WORD = re.compile(r"\w+")


def carries_content(text: str) -> bool:
    """Rule 1: enough characters, and a word that is not a stop word."""
    return (len("".join(text.split())) >= MIN_CHARS
            and any(w.lower() not in STOP_WORDS for w in _WORD.findall(text)))


def whole_words(output: str, start: int, end: int) -> bool:
    """Rule 2: ``output[start:end]`` neither starts nor ends inside a word."""
    inside = _inside_word
    return not inside(output, start) and not inside(output, end)


def is_citation(span: Span, output: str) -> bool:
    """Whether ``span`` (of the text ``output``, as far as it is known) is a citation by
    rules 1 and 2 on its own. A span that ends where ``output`` ends now is judged as
    whole at its end: callers judge a span once the text after it is known."""
    return carries_content(span.text) and whole_words(output, span.out_start, span.out_end)


def citations(spans: Sequence[Span], output: str, support: float | None = None
              ) -> list[Span]:
    """The citations among ``spans`` (copied and matched, any order) of ``output``, in
    output order (a copied one first at a tie), adjacent pieces merged: the module's rules.
    ``support`` is the answer's support by the shown context, ``None`` when unknown."""
    if support is not None and support < MIN_SUPPORT:
        return []
    ordered = sorted(spans, key=lambda s: (s.out_start, s.kind != "copied"))
    out: list[Span] = []
    for group in _stretches(ordered, output):
        first, last = group[0], group[-1]
        text = output[first.out_start:last.out_end]
        if carries_content(text) and whole_words(output, first.out_start, last.out_end):
            out += [_without_trailing_function_words(s) for s in _merged(group, output)]
    return out


_TRAILING_WORD = re.compile(r"\s+(\w+)\s*$")


def _without_trailing_function_words(span: Span) -> Span:
    """``span`` ending on its last content word: the mark follows "Brecker", not a dangling
    "in" ("... Brecker in[1] 2009" read as a cited "in"); output and passage shrink alike."""
    text = span.text
    while (m := _TRAILING_WORD.search(text)) and m.group(1).lower() in STOP_WORDS \
            and carries_content(text[:m.start()]):
        text = text[:m.start()]
    cut = len(span.text) - len(text)
    if not cut:
        return span
    return Span(text=text, out_start=span.out_start, out_end=span.out_end - cut,
                passage=span.passage, src_start=span.src_start, src_end=span.src_end - cut,
                token_start=span.token_start, token_end=span.token_end,
                source_row=span.source_row, kind=span.kind)


def _stretches(spans: Sequence[Span], output: str) -> list[list[Span]]:
    """``spans`` (in output order) grouped into runs that continue one another: same
    passage, the text between two of them the same in the output and in the passage."""
    groups: list[list[Span]] = []
    for span in spans:
        if groups and _continues(groups[-1][-1], span, output):
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def _continues(first: Span, then: Span, output: str) -> bool:
    return (then.passage.id == first.passage.id and then.out_start >= first.out_end
            and then.src_start >= first.src_end
            and output[first.out_end:then.out_start]
            == first.passage.text[first.src_end:then.src_start])


def _merged(group: Sequence[Span], output: str) -> list[Span]:
    """``group`` as one span (the invariant holds: the text between its pieces is the same
    in output and passage). Pieces of both kinds make a ``matched`` span: the stretch is
    verbatim in the passage, but not all of it came from the copy path."""
    if len({s.kind for s in group}) > 1:
        first, last = group[0], group[-1]
        return [Span(text=output[first.out_start:last.out_end], out_start=first.out_start,
                     out_end=last.out_end, passage=first.passage, src_start=first.src_start,
                     src_end=last.src_end, token_start=0, token_end=0, kind="matched")]
    out = [group[0]]
    for span in group[1:]:
        prev = out[-1]
        out[-1] = Span(text=output[prev.out_start:span.out_end], out_start=prev.out_start,
                       out_end=span.out_end, passage=prev.passage, src_start=prev.src_start,
                       src_end=span.src_end, token_start=prev.token_start,
                       token_end=span.token_end if span.kind == "copied" else prev.token_end,
                       source_row=prev.source_row, kind=prev.kind)
    return out


def _inside_word(text: str, at: int) -> bool:
    """Whether position ``at`` of ``text`` falls between two word characters."""
    return 0 < at < len(text) and _is_word(text[at - 1]) and _is_word(text[at])


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


__all__ = ["MIN_CHARS", "MIN_SUPPORT", "carries_content", "citations", "is_citation"]
