"""The three tasks and their metrics: FOLDOC entry completion (ROUGE-1 F1), FOLDOC acronym QA
(recall) and document QA with gold passages over the iso-codes tables (exact-answer recall and
cited-correct).

All are built deterministically from the corpus text, so anyone with the same ``dict-foldoc``
and ``iso-codes`` gets the same items. Items are split dev/test by a hash of their key;
calibration only ever sees ``dev``; the reported table only ``test``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from benchmarks.foldoc import Entry, chunk_entry, load_entries
from benchmarks.isocodes import answer_pattern, build_questions, load_tables

Split = Literal["dev", "test"]
Task = Literal["completion", "qa", "docqa"]
TASKS: tuple[Task, ...] = ("completion", "qa", "docqa")
PROMPT_WORDS = 30
REFERENCE_WORDS = 60
COMPLETION_INSTRUCTION = ("Continue this entry of the Free On-line Dictionary of Computing. "
                          "Write only the continuation.")
_TOKEN = re.compile(r"[a-z0-9]+")
_ACRONYM = re.compile(r"^[A-Z][A-Z0-9]{1,7}$")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9']*")
DOCQA_INSTRUCTION = "Answer in a few words."
QUESTIONS_PER_FAMILY = 50  # x 6 families = 300 doc-QA questions, about half per split
_STOP = frozenset({"a", "an", "and", "as", "at", "by", "for", "in", "of", "on", "or", "the",
                   "to", "with", "from"})


@dataclass(frozen=True)
class Item:
    """One benchmark input. ``query`` is what the passage source is searched with;
    ``references`` are the continuation (completion) or the gold answers (QA, doc-QA);
    ``gold_passage`` is the id of the one passage that holds a doc-QA answer."""

    task: Task
    key: str
    prompt: str
    query: str
    references: tuple[str, ...]
    entry_index: int
    gold_passage: str = ""


# --- metrics ------------------------------------------------------------------------------
def tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens (no stemming): what ROUGE-1 counts."""
    return _TOKEN.findall(text.lower())


def rouge1_f1(prediction: str, reference: str) -> float:
    """Unigram-overlap F1 (ROUGE-1), clipped counts, as in Lin 2004 without stemming."""
    pred, ref = Counter(tokens(prediction)), Counter(tokens(reference))
    overlap = sum((pred & ref).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def answer_recall(prediction: str, answers: Sequence[str]) -> float:
    """Answer-level recall (the paper's QA metric): 1.0 when the lower-cased output contains
    any lower-cased gold answer (whitespace collapsed), else 0.0."""
    out = _normalise(prediction)
    return float(any(_normalise(a) in out for a in answers if a.strip()))


def exact_answer_recall(prediction: str, answers: Sequence[str]) -> float:
    """Doc-QA recall: 1.0 when the output contains a gold answer as a whole token,
    case-insensitive ("854" does not count inside "1854", nor "85" inside "854")."""
    return float(any(answer_pattern(a).search(prediction) for a in answers if a.strip()))


def is_gold_passage(passage: Any, gold_id: str) -> bool:
    """The store returns the corpus passage ``gold_id`` as ``gold_id`` itself or as its one
    chunk (``nest_core.stores.ingest`` ids chunks ``"<doc id>#<n>"`` and keeps ``doc_id``)."""
    return bool(gold_id) and (passage.id == gold_id
                              or passage.metadata.get("doc_id") == gold_id)


def cited_correct(text: str, spans: Sequence[Any], answers: Sequence[str], gold_id: str) -> float:
    """1.0 when a gold answer occurs in ``text`` (as :func:`exact_answer_recall` finds it)
    wholly inside one span (``out_start:out_end`` of ``text``) whose passage is the gold
    passage, else 0.0. ``spans`` are :class:`~nest_core.types.Span` s: copied
    (``NestResult.spans``) or matched (``NestResult.matches``); spans that continue each
    other in output and in the source (copied "48." after the matched "0" of "048") count
    as one."""
    gold_spans: list[tuple[int, int, int]] = []  # (out_start, out_end, src_end)
    for s in sorted((s for s in spans if is_gold_passage(s.passage, gold_id)),
                    key=lambda s: s.out_start):
        prev = gold_spans[-1] if gold_spans else None
        if prev is not None and prev[1] == s.out_start and prev[2] == s.src_start:
            gold_spans[-1] = (prev[0], s.out_end, s.src_end)
        else:
            gold_spans.append((s.out_start, s.out_end, s.src_end))
    if not gold_spans:
        return 0.0
    for answer in answers:
        if not answer.strip():
            continue
        for m in answer_pattern(answer).finditer(text):
            if any(a <= m.start() and m.end() <= b for a, b, _ in gold_spans):
                return 1.0
    return 0.0


def answer_words(text: str) -> int:
    return len(text.split())


# --- splits -------------------------------------------------------------------------------
def _rank(key: str) -> int:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16)


def split_of(key: str) -> Split:
    """Stable dev/test assignment: even hash -> dev, odd -> test."""
    return "dev" if _rank(key) % 2 == 0 else "test"


def select(items: Sequence[Item], split: Split, n: int) -> list[Item]:
    """The first ``n`` items of ``split`` in hash order (a fixed pseudo-random sample)."""
    chosen = sorted((it for it in items if split_of(it.key) == split), key=lambda it: _rank(it.key))
    return chosen[:n]


# --- completion ---------------------------------------------------------------------------
def completion_items(entries: Sequence[Entry] | None = None) -> list[Item]:
    """Entries whose first passage holds 30 prompt words plus 60 reference words.

    Requiring both inside the first ~100-word passage keeps the task "held-in": the true
    continuation is in the corpus, in one passage, that the source can retrieve.
    """
    entries = load_entries() if entries is None else entries
    items = []
    for i, entry in enumerate(entries):
        first = chunk_entry(entry, i)[0].text.split()
        if len(first) < PROMPT_WORDS + REFERENCE_WORDS:
            continue
        head = " ".join(first[:PROMPT_WORDS])
        ref = " ".join(first[PROMPT_WORDS:PROMPT_WORDS + REFERENCE_WORDS])
        prompt = f"{COMPLETION_INSTRUCTION}\n\n{entry.headword}: {head}"
        items.append(Item(task="completion", key=f"completion:{entry.headword}",
                          prompt=prompt, query=f"{entry.headword}: {head}",
                          references=(ref,), entry_index=i))
    return items


# --- acronym QA ---------------------------------------------------------------------------
def _aligns(letters: str, words: Sequence[str]) -> bool:
    """Does the phrase ``words`` spell the acronym ``letters``?

    Every non-stop word must start with the next letter and may supply further letters from
    its inner *capitals*, in order ("HyperText" -> HT, "OpenLook" -> OL); stop words may be
    skipped; every letter must be used and the phrase must start and end on a real word. An
    all-capitals word inside the acronym ("HTTP servers" for HTTPS) is not an expansion.
    """
    upper = letters.upper()
    if len(words) < 2 or any(upper in w.upper() or (len(w) > 1 and w.isupper() and w in upper)
                             or (len(w) < 2 and w.lower() not in _STOP) for w in words):
        return False
    letters, low = letters.lower(), [w.lower() for w in words]
    if not low or low[0] in _STOP or low[-1] in _STOP:
        return False

    def match(li: int, wi: int) -> bool:
        if wi == len(low):
            return li == len(letters)
        word = low[wi]
        if word in _STOP and match(li, wi + 1):
            return True
        if li == len(letters) or word[0] != letters[li]:
            return False
        # take the first letter, then optionally more letters from inside the word
        for take in _inner_takes(words[wi], letters[li + 1:]):
            if match(li + 1 + take, wi + 1):
                return True
        return False

    return match(0, 0)


def _inner_takes(word: str, rest: str) -> list[int]:
    """How many of ``rest``'s leading letters appear, in order, among ``word[1:]``'s capitals."""
    if word.isupper():
        return [0]  # an all-capitals word ("ASSET") stands for its first letter only
    caps = "".join(c if c.isupper() or c.isdigit() else " " for c in word).lower()
    takes, pos = [0], 1
    for k, ch in enumerate(rest):
        pos = caps.find(ch, pos)
        if pos < 0:
            break
        takes.append(k + 1)
        pos += 1
    return list(reversed(takes))  # prefer long takes ("ABnormal")


def expansions_in(text: str, acronym: str) -> list[str]:
    """Every phrase of ``text`` that spells ``acronym`` (see :func:`_aligns`), as written."""
    spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"[A-Za-z][\w']*", text)]
    parts = [(s, e, [p for p in re.split(r"[-/]", w) if p]) for s, e, w in spans]
    found: list[str] = []
    max_words = len(acronym) + 3
    for a in range(len(parts)):
        words: list[str] = []
        for b in range(a, min(a + max_words, len(parts))):
            words += parts[b][2]
            if _aligns(acronym, words):
                phrase = text[parts[a][0]:parts[b][1]]
                if any(c in phrase for c in "().;:[]\"") :
                    continue  # a phrase never runs across a sentence or a bracket
                if phrase.lower() not in {f.lower() for f in found}:
                    found.append(phrase)
    return found


def qa_items(entries: Sequence[Entry] | None = None) -> list[Item]:
    """"What does the acronym X stand for?" for acronyms headed by exactly one entry whose
    first passage spells the expansion out; gold answers are all spellings found there
    (and in the header lines)."""
    entries = load_entries() if entries is None else entries
    owners: Counter[str] = Counter(h for e in entries for h in set(e.headwords)
                                   if _ACRONYM.match(h))
    items = []
    for i, entry in enumerate(entries):
        passage = chunk_entry(entry, i)[0]
        for acronym in entry.headwords:
            if not _ACRONYM.match(acronym) or owners[acronym] != 1 or len(acronym) < 3:
                continue
            body = expansions_in(passage.text, acronym)
            if not body:
                continue  # the answer must be in the passage text, where it can be copied
            header = [h for h in entry.headwords if h != acronym and _aligns(
                acronym, [p for w in _WORD.findall(h) for p in re.split(r"[-/]", w) if p])]
            golds = tuple(dict.fromkeys([*body, *header]))
            question = f"What does the acronym {acronym} stand for?"
            items.append(Item(task="qa", key=f"qa:{acronym}", prompt=question, query=question,
                              references=golds, entry_index=i))
    return items


# --- document QA (iso-codes) --------------------------------------------------------------
def docqa_items(tables: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
                per_family: int = QUESTIONS_PER_FAMILY) -> list[Item]:
    """"What is the ISO 3166-1 numeric code of Burkina Faso? Answer in a few words." with one
    exact answer and one gold passage (:func:`benchmarks.isocodes.build_questions`)."""
    tables = load_tables() if tables is None else tables
    return [Item(task="docqa", key=q.key, prompt=f"{q.question} {DOCQA_INSTRUCTION}",
                 query=q.question, references=(q.answer,), entry_index=i,
                 gold_passage=q.passage_id)
            for i, q in enumerate(build_questions(tables, per_family))]
