"""Is there an answer in the documents? Measurable evidence (beyond the paper).

* :func:`relevance`: how close in meaning the question is to the best retrieved passage
  (cosine of sentence embeddings). A question the documents do not answer is far from all
  of them; paraphrases ("time off for a new baby" / "parental leave") stay close, where
  shared words would miss them (handbook dev: the lexical share of the question's terms a
  passage holds abstained on 20% of answerable questions for 77% of unanswerable ones;
  the cosine on 4.5% for 85%).
* :func:`answer_support`: how much of what the answer adds to the question (its content
  words not already in the question) the context holds. An answer read from the context
  repeats its words; a made-up one ("$100,000") does not. Lexical on purpose: names,
  numbers, commands and file names decide document answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from nest_core.focus import Embed, cosines, stem, terms, titled
from nest_core.types import Passage

# Words an answer adds that say nothing about where it came from (stemmed as terms() does).
FILLER = frozenset(stem(w) for w in (
    "them", "him", "her", "his", "hers", "one", "also", "yes", "use", "used", "using",
    "need", "needs", "like", "just", "only", "all", "any", "some", "more", "most", "other",
    "such", "each", "both", "very", "here", "out", "up", "get", "make", "way", "thing",
    "things", "however", "because", "so", "but", "then", "there", "following", "example"))


def relevance(question: str, passages: Sequence[Passage], embed: Embed) -> float:
    """The largest cosine similarity, under ``embed``, between the question and a passage
    (its title and text); 0.0 without passages."""
    if not passages:
        return 0.0
    return max(cosines(question, [titled(p, p.text) for p in passages], embed))


def answer_support(question: str, answer: str, passages: Sequence[Passage]) -> float:
    """The share of the answer's new content words (not in the question) that the
    ``passages`` hold; 1.0 for an answer that adds no word to the question."""
    asked = terms(question)
    new = [t for t in terms(answer) if t not in asked and t not in FILLER]
    if not new:
        return 1.0
    context: set[str] = set()
    for p in passages:
        context |= terms(titled(p, p.text))
    return sum(t in context for t in new) / len(new)


_YES_NO = re.compile(r"^\W*(?:is|are|was|were|am|do|does|did|can|could|should|would|will|"
                     r"shall|may|might|must|has|have|had)(?:n't)?\b", re.IGNORECASE)


def asks_yes_or_no(question: str) -> bool:
    """Whether ``question`` opens with an auxiliary verb ("Is ...", "Does ...", "Can ..."):
    a quote of the context does not answer it; the model's yes or no does."""
    return bool(_YES_NO.match(question))


__all__ = ["Embed", "answer_support", "asks_yes_or_no", "relevance"]
