"""Is there an answer in the documents? Two measurable pieces of evidence (beyond the paper).

* :func:`question_coverage`: how much of the question (its content words and names,
  weighted as :mod:`nest_core.focus` weighs them, rare words counting more) the best context
  holds. A question the documents do not answer usually shares its topic with them but not
  the specific thing it asks ("How much does X cost?" against pages about X).
* :func:`answer_support`: how much of what the answer adds to the question (its content
  words not already in the question) the context holds. An answer read from the context
  repeats its words; a made-up one ("$100,000") does not.

Both are lexical on purpose: names, numbers, commands and file names decide document
answers, and they are exactly what embeddings blur.
"""

from __future__ import annotations

from collections.abc import Sequence

from nest_core.focus import question_weights, stem, terms
from nest_core.types import Passage

# Words an answer adds that say nothing about where it came from (stemmed as terms() does).
FILLER = frozenset(stem(w) for w in (
    "them", "him", "her", "his", "hers", "one", "also", "yes", "use", "used", "using",
    "need", "needs", "like", "just", "only", "all", "any", "some", "more", "most", "other",
    "such", "each", "both", "very", "here", "out", "up", "get", "make", "way", "thing",
    "things", "however", "because", "so", "but", "then", "there", "following", "example"))


def question_coverage(question: str, passages: Sequence[Passage]) -> float:
    """The largest share, over ``passages`` (title and text), of the question's term weight
    that one passage holds: 1.0 when a passage holds every content word and name of the
    question, 0.0 when none (or the question has no content word)."""
    wanted = question_weights(question)
    total = sum(wanted.values())
    if not total or not passages:
        return 0.0
    best = 0.0
    for p in passages:
        bag = terms(f"{p.title}\n{p.text}" if p.title else p.text)
        best = max(best, sum(w for t, w in wanted.items() if t <= bag) / total)
    return best


def answer_support(question: str, answer: str, passages: Sequence[Passage]) -> float:
    """The share of the answer's new content words (not in the question) that the
    ``passages`` hold; 1.0 for an answer that adds no word to the question."""
    asked = terms(question)
    new = [t for t in terms(answer) if t not in asked and t not in FILLER]
    if not new:
        return 1.0
    context: set[str] = set()
    for p in passages:
        context |= terms(f"{p.title}\n{p.text}" if p.title else p.text)
    return sum(t in context for t in new) / len(new)


__all__ = ["answer_support", "question_coverage"]
