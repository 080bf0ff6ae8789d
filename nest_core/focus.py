"""Question focus: the sentences of the retrieved passages that answer the question.

Beyond the paper (``NestConfig.focus_sentences``). A small LM reading three whole passages
often answers from the wrong line: the numeric code of the neighbouring country in a code
table, the year of the wrong event in an office description. The retriever ranked whole
passages; this ranks their *sentences* against the question, lexically: every question word
(lower case, crude suffix stemming, stop words dropped) that a sentence holds adds its
inverse sentence frequency among the candidate sentences, so the rare, specific words of the
question ("Romania", "Ghent", "opened") decide and the words every sentence shares ("code",
"office") barely count; a word the question capitalises mid-sentence (a name: "Euro",
"Ghent") counts twice, so "the currency Euro" finds the Euro line, not any line that
mentions a currency. Lexical on purpose: it needs no model, runs in microseconds, and
names and numbers, which embeddings blur, are exactly what document QA asks about.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from nest_core.types import Passage

# Sentence ends: a line break, or . ! ? followed by white space (the next sentence's first
# character is not checked: code tables and lists start lines in lower case or digits).
_SENTENCE_END = re.compile(r"\n+|(?<=[.!?])\s+")
_WORD = re.compile(r"\w+", re.UNICODE)
STOP_WORDS = frozenset((
    "a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "for", "by", "with", "from",
    "is", "are", "was", "were", "be", "been", "do", "does", "did", "what", "which", "who",
    "whom", "when", "where", "why", "how", "it", "its", "this", "that", "these", "those", "as",
    "i", "you", "we", "they", "he", "she", "my", "your", "our", "their", "me", "us", "there",
    "can", "could", "should", "would", "will", "shall", "may", "might", "must", "have", "has",
    "had", "not", "no", "if", "then", "than", "so", "about", "into", "tell", "please",
    "answer", "few", "words", "word", "briefly", "give", "explain", "describe",
))


@dataclass(frozen=True)
class Sentence:
    """One sentence of a passage: ``passage.text[start:end]`` (stripped of white space)."""

    passage_index: int
    start: int
    end: int
    score: float


def stem(word: str) -> str:
    """Crude English suffix stripping so "open" meets "opened" and "offices" meets "office"."""
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def terms(text: str) -> set[str]:
    """The content words of ``text``, lower-cased and stemmed."""
    return {stem(w) for w in (m.lower() for m in _WORD.findall(text)) if w not in STOP_WORDS}


def question_weights(question: str) -> dict[str, float]:
    """Question terms -> weight: 2 for a name (capitalised, not the first word of a
    sentence), else 1."""
    out: dict[str, float] = {}
    for m in _WORD.finditer(question):
        word = m.group().lower()
        if word in STOP_WORDS:
            continue
        before = question[: m.start()].rstrip()
        name = m.group()[0].isupper() and bool(before) and before[-1] not in ".!?:\n"
        term = stem(word)
        out[term] = max(out.get(term, 0.0), 2.0 if name else 1.0)
    return out


def split_sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character ranges of the non-empty sentences of ``text``."""
    out, pos = [], 0
    for m in [*_SENTENCE_END.finditer(text), None]:
        end = m.start() if m else len(text)
        chunk = text[pos:end]
        lead = len(chunk) - len(chunk.lstrip())
        if chunk.strip():
            out.append((pos + lead, pos + len(chunk.rstrip())))
        if m:
            pos = m.end()
    return out


def rank_sentences(question: str, passages: Sequence[Passage]) -> list[Sentence]:
    """Every sentence of ``passages``, best first: summed (weighted) inverse sentence
    frequency of the question's words it holds; ties keep passage (retrieval) order, then text order."""
    spans = [(i, a, b) for i, p in enumerate(passages) for a, b in split_sentences(p.text)]
    bags = [terms(passages[i].text[a:b]) for i, a, b in spans]
    wanted = question_weights(question)
    df = Counter(t for bag in bags for t in bag & wanted.keys())
    n = len(bags)
    idf = {t: wanted[t] * math.log(1.0 + n / df[t]) for t in df}
    scored = [Sentence(i, a, b, sum(idf[t] for t in bag & wanted.keys()))
              for (i, a, b), bag in zip(spans, bags, strict=True)]
    return sorted(scored, key=lambda s: -s.score)  # stable: ties stay in retrieval order


def best_sentences(question: str, passages: Sequence[Passage], k: int) -> list[Sentence]:
    """The ``k`` best sentences for ``question``; one sharing no word with it never counts."""
    return [s for s in rank_sentences(question, passages)[:k] if s.score > 0]


def focus_passages(passages: Sequence[Passage], best: Sequence[Sentence]) -> list[Passage]:
    """The passages cut down to the ``best`` sentences (passages with none dropped), in
    retrieval order, each keeping its id, title and metadata."""
    out = []
    for i, p in enumerate(passages):
        mine = sorted((s.start, s.end) for s in best if s.passage_index == i)
        if mine:
            out.append(Passage(id=p.id, text=" ... ".join(p.text[a:b] for a, b in mine),
                               title=p.title, metadata=dict(p.metadata)))
    return out
