"""Matched attribution: text the LM wrote itself that a retrieved passage holds verbatim.

Copied spans (:mod:`nest_core.attribution`) only cover what Nest's copy path produced. When
the LM writes a fact itself (in RA-Nest it reads the passages in its prompt and writes
"854" digit by digit), :func:`match_spans` finds it after decoding and cites it as a
``Span`` with ``kind="matched"``.

What is matched:

* **Words.** A word is a run of word characters (``\\w``: letters, digits, ``_``), where
  one of ``. , : / -`` between two word characters joins them ("3.5", "2,000", "10:30",
  "e-mail", "U.S"; an apostrophe does not join, so "Odile's" holds the name "Odile"). A
  match starts at the start of a word and ends at the end of one, in the output *and* in
  the passage: "85" is never matched inside "854", nor "Ghent" inside "Ghent-Brugge", nor
  "3" inside "3.5".
* **Stretches.** A stretch is the output text from the start of one word to the end of a
  later one (the spaces and punctuation between them included). It must occur verbatim,
  case-sensitively, in a passage, and none of its words may overlap a copied span.
* **Greedy, left to right.** From the first uncited word, the longest stretch that some
  passage contains is taken; of the passages that contain it, the highest-ranked one (the
  first in ``passages``, which is retrieval order) for which it is a citation is cited, at
  the stretch's first occurrence there. Matching resumes after the stretch; a stretch that
  is no citation is skipped one word at a time.

The minimum match (what is a citation and what is mere shared vocabulary). A stretch is
cited when any of these holds:

1. it has at least :data:`MIN_WORDS` (4) words ("was founded by the", "the number of
   days"); three common words ("of the", "is in the") are not enough;
2. it holds a *number*: a digit, and at least two letters or digits in all ("854", "2019",
   "3.5", "B2", "7 days"; a lone "7" is not);
3. it holds a *code*: a word with an upper-case letter after its first character ("BFA",
   "FOLDOC", "iPhone", "McDonald");
4. it holds a *name*: a word of an upper-case letter followed by a lower-case one ("Ghent",
   "Odile") that is not at the start of a sentence in the output. At a sentence start
   (the start of the text, a line, or after ``. ! ? :``) capitals say nothing ("The", "It"),
   so such a word counts only when the cited passage also writes it capitalised in the
   middle of a sentence and never in lower case: the answer "Ghent." is cited from "...
   offices in Ghent and Lyon", the answer "The ..." is not cited from "... the ...".
   "I" and "A" are not names;
5. it holds a *rare word*: a word of at least 3 characters, not a stop word, that the
   cited passage holds and no other retrieved passage does (compared in lower case, whole
   words; at least two passages retrieved). That is how codes written in lower case
   ("tha", the ISO 639-3 code of Thai) are cited, while "the" or "office", which most
   passages hold, are not.

A word the copy path began or finished is completed: when a copied span starts or ends
inside a word ("48." copied after the LM wrote "0") and the LM's rest of the word continues
the span's source there, up to a word boundary in the source too, that rest is a matched
span whatever its size ("0"), so the answer "048" is cited whole, by two adjacent spans.

Matched spans carry exact offsets under the copied-span rule
(``text == output[out_start:out_end] == passage.text[src_start:src_end]``, no surrounding
whitespace, since a stretch starts and ends with a word character). They have no token
range: ``token_start == token_end == 0`` (so ``num_tokens`` is 0 and
``NestResult.attribution_ratio`` stays the paper's copied-only metric) and
``source_row == 0``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nest_core.focus import STOP_WORDS
from nest_core.types import Passage, Span

MIN_WORDS = 4  # a stretch of this many words is a citation whatever its words are

_JOINER_CHARS = ".,:/-"
_WORD = re.compile(r"\w+(?:[.,:/\-]\w+)*")  # a word: word characters, joiners inside
_SENTENCE_ENDS = ".!?:"
# skipped when looking back for a sentence start: quotes, brackets, list and heading marks
_OPENERS = "\"'“‘«([{*_#>-–—•"


def match_spans(text: str, passages: Sequence[Passage], copied: Sequence[Span]) -> list[Span]:
    """Stretches of ``text`` not covered by ``copied`` that occur verbatim in a passage and
    pass the minimum-match rule (module docstring), as ``kind="matched"`` spans in output
    order. ``passages`` are in retrieval order (a higher-ranked passage is cited first)."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    rests = word_rests(text, words, copied)
    taken = [*copied, *rests]
    free = [not any(s.out_start < end and s.out_end > start for s in taken)
            for start, end in words]
    sources = [p for p in passages if p.text]
    found: list[Span] = list(rests)
    i = 0
    while i < len(words):
        if not free[i]:
            i += 1
            continue
        last, hits = _longest(text, words, free, i, sources)
        span = _cite(text, words[i:last + 1], hits, sources) if hits else None
        if span is None:
            i += 1
            continue
        found.append(span)
        i = last + 1
    return sorted(found, key=lambda s: s.out_start)


def word_rests(text: str, words: Sequence[tuple[int, int]], copied: Sequence[Span]
               ) -> list[Span]:
    """The LM-written rests of words that copied spans start or end inside, where they
    continue the span's source verbatim up to a word boundary there (module docstring)."""
    out = []
    for s in copied:
        src = s.passage.text
        for start, end in words:
            if start < s.out_start < end:  # the span starts inside this word
                a, b = start, s.out_start
                at = s.src_start - (b - a)
            elif start < s.out_end < end:  # the span ends inside this word
                a, b = s.out_end, end
                at = s.src_end
            else:
                continue
            piece = text[a:b]
            if at >= 0 and src[at:at + len(piece)] == piece and piece.strip() == piece \
                    and not splits_word(src, at if a == start else at + len(piece)) \
                    and not any(c.out_start < b and c.out_end > a for c in copied):
                out.append(Span(text=piece, out_start=a, out_end=b, passage=s.passage,
                                src_start=at, src_end=at + len(piece), token_start=0,
                                token_end=0, kind="matched"))
    return out


def _longest(text: str, words: Sequence[tuple[int, int]], free: Sequence[bool], first: int,
             sources: Sequence[Passage]) -> tuple[int, list[tuple[Passage, int]]]:
    """The last word of the longest stretch from word ``first`` found in some passage, and
    ``(passage, offset of its first occurrence)`` for every passage (in rank order) that
    holds it. A passage that lacks a stretch lacks every longer one, so each extension only
    searches the passages that held the previous one, from where it was found."""
    start = words[first][0]
    hits: list[tuple[Passage, int]] = [(p, 0) for p in sources]
    best: list[tuple[Passage, int]] = []
    last = first
    j = first
    while j < len(words) and free[j] and hits:
        needle = text[start:words[j][1]]
        hits = [(p, found) for p, at in hits
                if (found := find_word_aligned(p.text, needle, at)) >= 0]
        if hits:
            best, last = hits, j
        j += 1
    return last, best


def find_word_aligned(haystack: str, needle: str, start: int = 0) -> int:
    """The first offset ``>= start`` where ``needle`` (which starts and ends with a word
    character) occurs in ``haystack`` without starting or ending inside a word; -1 if none."""
    at = haystack.find(needle, start)
    while at >= 0:
        if not splits_word(haystack, at) and not splits_word(haystack, at + len(needle)):
            return at
        at = haystack.find(needle, at + 1)
    return -1


def splits_word(text: str, pos: int) -> bool:
    """Whether a cut at ``pos`` falls inside a word: between two word characters ("85|4"),
    or beside a joiner that has a word character on each side ("3|.5", "3.|5")."""
    if pos <= 0 or pos >= len(text):
        return False
    before, after = text[pos - 1], text[pos]
    if _is_word_char(before):
        return _is_word_char(after) or (after in _JOINER_CHARS and pos + 1 < len(text)
                                         and _is_word_char(text[pos + 1]))
    return (before in _JOINER_CHARS and _is_word_char(after) and pos >= 2
            and _is_word_char(text[pos - 2]))


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"  # what ``\w`` matches in a str pattern


def _cite(text: str, words: Sequence[tuple[int, int]],
          hits: Sequence[tuple[Passage, int]], sources: Sequence[Passage]) -> Span | None:
    """The span for the stretch over ``words``, cited from the first passage of ``hits``
    for which it passes the minimum-match rule, or ``None``."""
    out_start, out_end = words[0][0], words[-1][1]
    stretch = text[out_start:out_end]
    for passage, at in hits:
        if is_citation(text, words, passage, sources):
            return Span(text=stretch, out_start=out_start, out_end=out_end, passage=passage,
                        src_start=at, src_end=at + len(stretch), token_start=0, token_end=0,
                        kind="matched")
    return None


def is_citation(text: str, words: Sequence[tuple[int, int]], passage: Passage,
                sources: Sequence[Passage] = ()) -> bool:
    """The minimum-match rule (module docstring) for the stretch of ``text`` over ``words``
    (``(start, end)`` offsets of consecutive words) found in ``passage``, one of the
    retrieved ``sources``."""
    if len(words) >= MIN_WORDS:
        return True
    stretch = text[words[0][0]:words[-1][1]]
    if any(c.isdigit() for c in stretch) and sum(c.isalnum() for c in stretch) >= 2:
        return True
    for start, end in words:
        word = text[start:end]
        if any(c.isupper() for c in word[1:]):
            return True  # a code: BFA, iPhone
        if _name_shaped(word) and (not _sentence_initial(text, start)
                                   or _proper_noun_in(passage.text, word)):
            return True
        if _rare(word, passage, sources):
            return True
    return False


def _rare(word: str, passage: Passage, sources: Sequence[Passage]) -> bool:
    """Rule 5: only ``passage`` of the (two or more) ``sources`` holds ``word``."""
    low = word.lower()
    if len(low) < 3 or low in STOP_WORDS or len(sources) < 2:
        return False
    return all(find_word_aligned(p.text.lower(), low) < 0 for p in sources if p is not passage)


def _name_shaped(word: str) -> bool:
    return len(word) >= 2 and word[0].isupper() and word[1].islower()


def _sentence_initial(text: str, pos: int) -> bool:
    """Whether ``pos`` starts a sentence: the text or a line starts there, or only
    openers (quotes, brackets, list marks) and spaces stand between it and ``. ! ? :``."""
    k = pos
    while k > 0 and (text[k - 1].isspace() or text[k - 1] in _OPENERS):
        if text[k - 1] == "\n":
            return True
        k -= 1
    return k == 0 or text[k - 1] in _SENTENCE_ENDS


def _proper_noun_in(passage_text: str, word: str) -> bool:
    """The passage writes ``word`` capitalised mid-sentence and never in lower case."""
    if find_word_aligned(passage_text, word.lower()) >= 0:
        return False
    return any(not _sentence_initial(passage_text, at)
               for at in _occurrences(passage_text, word))


def _occurrences(haystack: str, needle: str) -> list[int]:
    found, at = [], find_word_aligned(haystack, needle)
    while at >= 0:
        found.append(at)
        at = find_word_aligned(haystack, needle, at + 1)
    return found
