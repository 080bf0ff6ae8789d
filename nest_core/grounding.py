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
* :func:`missing_names`: the names the question writes ("Kubernetes", "Nextcloud",
  "Proxmox VE") that no retrieved passage holds. A question on the documents' topic about
  a thing they never mention is close in meaning to them (the cosine passes it) but names
  what they lack; handbook dev: 12 of 13 unanswerable questions declined with
  ``abstain_below`` 0.46 (11 without), no answerable one more
  (``benchmarks/abstention_signals.py``).
* :func:`missing_rare_words`: the rare words the question writes (outside a general English
  vocabulary: "firewalld", "TOTP", "Proxmox", "systemd") that no retrieved passage holds:
  the same evidence as a missing name, for the tools and terms users type in lower case and
  without the common words a name can be ("Zoom", "Cockpit") or the acronyms a question is
  qualified by ("ISO", in the vocabulary); ``abstain_rare``.
* :func:`coverage`: the share of the question's content words the passages hold, weighted
  by rarity among them (measured, not used: its threshold did not carry from dev to test).
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from importlib import resources

from nest_core.focus import (
    STOP_WORDS,
    Embed,
    content_words,
    cosines,
    question_names,
    stem,
    terms,
    titled,
)
from nest_core.types import Passage

_ACRONYM = re.compile(r"\b[A-Z][A-Z0-9]+\b")  # "ISO", "RAID", "UTF8"

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


def passage_terms(passages: Sequence[Passage]) -> list[frozenset[str]]:
    """Each passage's :func:`~nest_core.focus.terms`, its title included."""
    return [terms(titled(p, p.text)) for p in passages]


def missing_names(question: str, passages: Sequence[Passage]) -> list[frozenset[str]]:
    """The names ``question`` writes (:func:`nest_core.focus.question_names`, stemmed words
    each) that no passage holds whole (its title and text, every word of the name); none
    without passages (nothing to judge by). A name written in capitals alone ("ISO",
    "RAID") does not count: an acronym often qualifies what is asked ("the ISO 3166-1 code
    of Romania") and the passage that answers need not spell it."""
    bags = passage_terms(passages)
    if not bags:
        return []
    acronyms = {stem(w.lower()) for w in _ACRONYM.findall(question)}
    return [n for n in question_names(question)
            if not n <= acronyms and not any(n <= b for b in bags)]


# The whole lower-case words of the bert-base-uncased WordPiece vocabulary (all-MiniLM-L6-v2's,
# Apache 2.0; 21,719 words): the common English a tokenizer trained on books and Wikipedia
# keeps whole. A word outside it, and outside it less one affix, is rare.
_VOCABULARY = "english_words.txt"
_PREFIXES = ("re", "un", "non", "pre", "dis", "over", "sub", "multi", "inter", "co", "de",
             "mis", "out")
_SUFFIXES = ("able", "ible", "less", "ness", "ers", "er", "ing", "ed", "es", "s", "ly", "ful")
_LETTERS = re.compile(r"[^\W\d_]+")  # runs of letters: the words a vocabulary can judge
MIN_RARE_LETTERS = 3  # shorter words ("js", the "d" of "d'Ivoire") are fragments, not terms


@functools.cache
def _vocabulary() -> tuple[frozenset[str], frozenset[str]]:
    """The vocabulary's words and their stems."""
    text = resources.files("nest_core").joinpath("data", _VOCABULARY).read_text("utf-8")
    words = frozenset(text.split())
    return words, frozenset(stem(w) for w in words)


def _fold(word: str) -> str:
    """``word`` without accents ("côte" -> "cote"), as the vocabulary writes it."""
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


@functools.lru_cache(maxsize=8192)
def familiar(word: str) -> bool:
    """Whether the lower-case ``word`` is common English: in the vocabulary, by its stem
    ("enlarges"), or less one common prefix or suffix ("rerun", "writable", "rootless")."""
    words, stems = _vocabulary()

    def known(w: str) -> bool:
        return w in words or stem(w) in stems

    word = _fold(word)
    if known(word):
        return True
    return any(word.startswith(p) and len(word) - len(p) >= MIN_RARE_LETTERS
               and known(word[len(p):]) for p in _PREFIXES) \
        or any(word.endswith(s) and len(word) - len(s) >= MIN_RARE_LETTERS
               and (known(word[:-len(s)]) or known(word[:-len(s)] + "e")) for s in _SUFFIXES)


def missing_rare_words(question: str, passages: Sequence[Passage]) -> list[str]:
    """The rare words ``question`` writes (not :func:`familiar`; letters only, at least
    :data:`MIN_RARE_LETTERS`) that no passage holds (title or text, by stem), lower case;
    none without passages, and none for a question that does not read as English (no
    English stop word, or fewer than half its words familiar or stop words: the vocabulary
    cannot judge "Wie lange dauert die Elternzeit?")."""
    bags = passage_terms(passages)
    words = [m.lower() for m in _LETTERS.findall(question)]
    english = sum(w in STOP_WORDS or familiar(w) for w in words)
    if not bags or not STOP_WORDS.intersection(words) or 2 * english < len(words):
        return []
    rare = [w for w in dict.fromkeys(content_words(question))
            if w.isalpha() and len(w) >= MIN_RARE_LETTERS and not familiar(w)]
    return [w for w in rare if not any(stem(w) in b for b in bags)]


# The abstention rules that decline a question writing a word no retrieved passage holds:
# the NestConfig flag that turns each on, and what it finds missing (nothing: it passes).
LEXICAL_RULES: dict[str, Callable[[str, Sequence[Passage]], Sequence[object]]] = {
    "abstain_unnamed": missing_names,
    "abstain_rare": missing_rare_words,
}


def coverage(question: str, passages: Sequence[Passage]) -> float:
    """The weighted share of the question's content words that some passage (title and
    text) holds; each word weighs its inverse frequency among the passages,
    ``log(1 + (n + 1) / (df + 1))``, so a word no passage holds weighs most and one every
    passage holds least; 1.0 for a question without content words, 0.0 without passages."""
    asked = terms(question)
    if not asked:
        return 1.0
    if not passages:
        return 0.0
    bags = passage_terms(passages)
    n = len(bags)
    weight = {t: math.log(1.0 + (n + 1) / (1 + sum(t in b for b in bags))) for t in asked}
    return sum(w for t, w in weight.items() if any(t in b for b in bags)) / sum(weight.values())


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


__all__ = ["Embed", "answer_support", "asks_yes_or_no", "coverage", "missing_names",
           "relevance"]
