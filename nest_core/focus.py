"""Question focus: the sentences of the retrieved passages that answer the question.

Beyond the paper (``NestConfig.focus_sentences``). A small LM reading three whole passages
often answers from the wrong line: the numeric code of the neighbouring country in a code
table, the year of the wrong event in an office description. The retriever ranked whole
passages; this ranks their *sentences* against the question, lexically: every question word
(lower case, crude suffix stemming, stop words dropped) that a sentence holds adds its
inverse sentence frequency among the candidate sentences, so the rare, specific words of the
question ("Romania", "Ghent", "opened") decide and the words every sentence shares ("code",
"office") barely count; a name the question writes (capitalised mid-sentence: "Euro",
"Ghent", "Halvorsen Orchard Robotics") counts as one term and 1.5 times, so "the currency
Euro" finds the Euro line, not any line that mentions a currency. Lexical on purpose: it
needs no model, runs in microseconds, and names and numbers, which embeddings blur, are
exactly what document QA asks about.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import Stemmer

from nest_core.types import Passage

# Sentence ends: a line break, or . ! ? followed by white space within a line, except after
# an abbreviation or an initial, or before a lower-case letter (:func:`split_sentences`).
_SENTENCE_END = re.compile(r"\n+|(?<=[.!?])[^\S\n]+")
_WORD_BEFORE_DOT = re.compile(r"(\w+(?:\.\w+)*)\.$")
# Words that end in a full stop without ending the sentence ("approx. 40 EUR", "Dr. Smith",
# "e.g. the CTO"); "etc." and "no." often do end one, so they are not here.
ABBREVIATIONS = frozenset((
    "approx", "appr", "ca", "cf", "e.g", "i.e", "eg", "ie", "vs", "viz", "al", "dr", "mr",
    "mrs", "ms", "prof", "st", "jr", "sr", "inc", "ltd", "co", "corp", "dept", "est", "fig",
    "figs", "incl", "excl", "min", "max", "nr", "vol", "pp", "p", "resp", "sec",
    "ch", "chap", "ed", "eds", "op", "cit", "ibid", "jan", "feb", "mar", "apr", "jun", "jul",
    "aug", "sep", "sept", "oct", "nov", "dec", "mon", "tue", "wed", "thu", "fri", "sat",
    "sun", "u.s", "u.k", "e.u", "a.m", "p.m"))
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
NAME_WEIGHT = 1.5  # a name in the question says more about the answer than a common word
# texts -> one vector each (the stores' embedding functions have this shape)
Embed = Callable[[list[str]], Sequence[Sequence[float]]]


@dataclass(frozen=True)
class Sentence:
    """One sentence of a passage: ``passage.text[start:end]`` (stripped of white space)."""

    passage_index: int
    start: int
    end: int
    score: float


_SNOWBALL = Stemmer.Stemmer("english")


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """The Snowball (Porter 2) English stem, so "open" meets "opened" and "offices" meets
    "office" (the suffix stripper this replaced made "offic" of one and "office" of the
    other). Memoised: re-ranking 200 passages stems the same words over and over."""
    return str(_SNOWBALL.stemWord(word))


def content_words(text: str) -> list[str]:
    """The words of ``text`` that are not :data:`STOP_WORDS`, lower-cased, in order."""
    return [w for w in (m.lower() for m in _WORD.findall(text)) if w not in STOP_WORDS]


@functools.lru_cache(maxsize=4096)
def terms(text: str) -> frozenset[str]:
    """The content words of ``text``, lower-cased and stemmed (memoised: a store's passages
    come back query after query)."""
    return frozenset(stem(w) for w in content_words(text))


def question_weights(question: str) -> dict[frozenset[str], float]:
    """Question terms -> weight. A term is a content word, or a *name*: a run of words the
    question capitalises mid-sentence ("Halvorsen Orchard Robotics", "Euro"), held by a
    sentence only when it holds all of its words, weighing :data:`NAME_WEIGHT`; one name
    counts once however many words it has, so the company a handbook is about does not
    outweigh the "headquarters" the question asks for."""
    out: dict[frozenset[str], float] = {}
    name: list[str] = []

    def close_name() -> None:
        if name:
            term = frozenset(name)
            out[term] = max(out.get(term, 0.0), NAME_WEIGHT)
            name.clear()

    for m in _WORD.finditer(question):
        word = m.group().lower()
        before = question[: m.start()].rstrip()
        capital = m.group()[0].isupper() and bool(before) and before[-1] not in ".!?:\n"
        if word in STOP_WORDS:
            close_name()
            continue
        if capital and (not name or question[m.start() - 1] == " "):
            name.append(stem(word))
            continue
        close_name()
        out.setdefault(frozenset((stem(word),)), 1.0)
    close_name()
    return out


def question_names(question: str) -> list[frozenset[str]]:
    """The names ``question`` writes (:func:`question_weights`: a run of words capitalised
    mid-sentence, stemmed), each as the set of its words."""
    return [t for t, w in question_weights(question).items() if w == NAME_WEIGHT]


def split_sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character ranges of the non-empty sentences of ``text``.

    A line break always ends a sentence (code tables and lists start lines in lower case or
    digits); within a line, . ! ? and white space do, unless the word before the full stop
    is an abbreviation (:data:`ABBREVIATIONS`) or a one-letter initial, or the next word
    starts in lower case. pysbd, measured on the handbook's dev questions
    (``benchmarks/focus_recall.py``), kept the answer in the focus less often (0.58 against
    0.61 at one sentence): it cuts inside lines where this does not."""
    out, pos = [], 0
    ends = [m for m in _SENTENCE_END.finditer(text) if _ends_sentence(text, m)]
    for m in [*ends, None]:
        end = m.start() if m else len(text)
        chunk = text[pos:end]
        lead = len(chunk) - len(chunk.lstrip())
        if chunk.strip():
            out.append((pos + lead, pos + len(chunk.rstrip())))
        if m:
            pos = m.end()
    return out


def _ends_sentence(text: str, m: re.Match[str]) -> bool:
    if "\n" in m.group() or m.end() >= len(text):
        return True
    if text[m.end()].islower():
        return False
    if text[m.start() - 1] != ".":
        return True
    before = _WORD_BEFORE_DOT.search(text, 0, m.start())
    word = before.group(1).lower() if before else ""
    return not (word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()))


def rank_sentences(question: str, passages: Sequence[Passage]) -> list[Sentence]:
    """Every sentence of ``passages``, best first: summed (weighted) inverse sentence
    frequency of the question's terms it holds, its passage's title included (a sentence
    means what its document's title says: "Švenčionys (district municipality): LT-49." is
    about Lithuania only through "ISO 3166-2 subdivision codes of Lithuania"); ties keep
    passage (retrieval) order, then text order."""
    spans = [(i, a, b) for i, p in enumerate(passages) for a, b in split_sentences(p.text)]
    scores = term_scores(question, [titled(passages[i], passages[i].text[a:b])
                                    for i, a, b in spans])
    scored = [Sentence(i, a, b, score) for (i, a, b), score in zip(spans, scores, strict=True)]
    return sorted(scored, key=lambda s: -s.score)  # stable: ties stay in retrieval order


def titled(passage: Passage, text: str) -> str:
    """``text`` of ``passage`` under its title: what a sentence or passage means."""
    return f"{passage.title}\n{text}" if passage.title else text


def term_scores(question: str, texts: Sequence[str]) -> list[float]:
    """Per text: the summed inverse frequency, among ``texts``, of the question's terms it
    holds, each weighted as :func:`question_weights` says (rare words and names decide)."""
    bags = [terms(text) for text in texts]
    wanted = question_weights(question)
    held = [[t for t in wanted if t <= bag] for bag in bags]
    df = Counter(t for ts in held for t in ts)
    idf = {t: wanted[t] * math.log(1.0 + len(bags) / df[t]) for t in df}
    return [sum(idf[t] for t in ts) for ts in held]


def continues_passage(prompt: str, passages: Sequence[Passage], words: int = 6) -> bool:
    """Whether ``prompt`` ends with ``words`` words that a passage holds verbatim (white
    space aside): the user pasted a passage's beginning and asks for the rest of it."""
    tail = prompt.split()[-words:]
    if len(tail) < words:
        return False
    needle = " ".join(tail)
    return any(needle in " ".join(p.text.split()) for p in passages)


def best_sentences(question: str, passages: Sequence[Passage], k: int, *,
                   embed: Embed | None = None, meaning: float = 0.0) -> list[Sentence]:
    """The ``k`` best sentences for ``question``; none when no sentence shares a word with
    it. With ``embed`` and ``meaning`` > 0, a sentence scores its shared words (scaled so
    the best sentence's are 1) plus ``meaning`` x its cosine to the question, so a
    paraphrase ("time off for a new baby" / "parental leave") can win over the sentence
    that merely repeats the question's words; without shared words anywhere there is
    nothing to anchor the meaning to, and the caller shows whole passages as before."""
    ranked = rank_sentences(question, passages)
    if not ranked or ranked[0].score <= 0:
        return []
    if embed is None or meaning <= 0:
        return [s for s in ranked[:k] if s.score > 0]
    top = ranked[0].score
    texts = [titled(passages[s.passage_index], passages[s.passage_index].text[s.start:s.end])
             for s in ranked]
    near = cosines(question, texts, embed)  # one per ranked sentence
    mixed = [dataclasses.replace(s, score=s.score / top + meaning * c)
             for s, c in zip(ranked, near, strict=True)]
    return sorted(mixed, key=lambda s: -s.score)[:k]


def cosines(question: str, texts: Sequence[str], embed: Embed) -> list[float]:
    """Cosine of each text to the question under ``embed`` (one call embeds them all)."""
    vectors = np.asarray(embed([question, *texts]), dtype=np.float32)  # [1 + n, d]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1.0)
    return [float(c) for c in unit[1:] @ unit[0]]


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


def rank_passages(question: str, passages: Sequence[Passage]) -> list[int]:
    """Indices of ``passages`` best first for ``question``: the summed (weighted) inverse
    passage frequency of the question's terms each passage (title and text) holds, as
    :func:`rank_sentences` scores sentences; ties keep the given (retriever) order.

    A dense retriever blurs names and codes (MiniLM ranks the passage on "Northern Bontok"
    below 150 others about languages): a name the question writes is exactly what lexical
    matching gets right, and the retriever's own order decides among equals."""
    scores = term_scores(question, [titled(p, p.text) for p in passages])
    return sorted(range(len(passages)), key=lambda i: -scores[i])  # stable
