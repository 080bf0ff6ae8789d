"""Abstention signals on the handbook questions: which evidence tells "the documents hold
this fact" from "they only share its topic"? No LM needed (retrieval and MiniLM: seconds).

For every question of the handbook benchmark (``benchmarks/handbook_qa.py``, the same
retrieval: the store's 200 nearest re-ranked by the question's words, top
:data:`~benchmarks.handbook_qa.NUM_PASSAGES`), the signals below are computed once; then,
for each rule and threshold, the share of unanswerable and of answerable questions the rule
abstains on, per split. A rule is tuned on ``dev`` only; ``test`` reports whether it holds.

Signals (higher = more evidence the documents answer the question):

* ``passage_cos``: the question's cosine to the best passage (title and text), MiniLM
  (:func:`nest_core.grounding.relevance`, the shipped ``abstain_below``);
* ``sentence_cos``: the cosine to the best single sentence (title included);
* ``margin``: best passage cosine minus the k-th (k = 5);
* ``coverage_any``: the share of the question's terms (:func:`nest_core.focus.terms`) held
  by some retrieved passage, unweighted;
* ``coverage_idf``: the same, each term weighted by its inverse document frequency over
  the whole store (the analysis knows the store; a decoder does not);
* ``coverage_local``: each term weighted by its inverse frequency among the retrieved
  passages, a term none holds weighing most (:func:`nest_core.grounding.coverage`: what a
  decoder can compute from the passages it was given);
* ``coverage_best``: the share of the question's terms the best-covering passage holds;
* ``coverage_named``: ``coverage_local`` over :func:`nest_core.focus.question_weights`'s
  terms (a name one term, weighing 1.5x, held only whole);
* ``names_held``: 1 when every name the question writes (capitalised mid-sentence) is held
  by some passage, else 0 (:func:`nest_core.grounding.missing_names`,
  ``NestConfig.abstain_unnamed``);
* ``rare_held``: 1 when every rare word the question writes (outside a general English
  vocabulary) is held by some passage, else 0 (:func:`nest_core.grounding.missing_rare_words`,
  ``NestConfig.abstain_rare``, shipped).

Rules: each signal alone (abstain below t), and ``passage_cos < a OR <second> < b`` for a
grid of ``a``, ``b`` (``--combine``): the two measure different things (topic, fact).
``names_held`` and ``rare_held`` have one threshold (missing or not): ``passage_cos < a OR
a rare word missing`` is the shipped default (``abstain_below`` = a, ``abstain_rare``).

Run: ``python -m benchmarks.abstention_signals [--rules ...]``
"""

from __future__ import annotations

import argparse
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.handbook_qa import NUM_PASSAGES, Question, load_questions

TARGET_UNANSWERABLE = 0.8  # abstain on at least this share of unanswerable questions
CAP_ANSWERABLE = 0.1  # ... and on at most this share of answerable ones
COS_GRID = (0.0, 0.40, 0.42, 0.44, 0.46, 0.48, 0.50)
COVERAGE_GRID = (0.0, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass
class Signals:
    q: Question
    values: dict[str, float]


def compute(questions: Sequence[Question], found: dict[str, list[Any]], embed: Any,
            store_df: Counter[str], store_size: int, sentences: bool = True
            ) -> list[Signals]:
    from nest_core.focus import cosines, split_sentences, terms, titled
    from nest_core.grounding import coverage, missing_names, missing_rare_words, relevance

    out = []
    for q in questions:
        ps = found[q.id]
        texts = [titled(p, p.text) for p in ps]
        cos = sorted(cosines(q.question, texts, embed), reverse=True) if ps else [0.0]
        lines = [titled(p, p.text[a:b]) for p in ps for a, b in split_sentences(p.text)] \
            if sentences else []  # the slow part: every sentence embedded
        sent_cos = max(cosines(q.question, lines, embed)) if lines else float("nan")
        asked = terms(q.question)
        bags = [terms(t) for t in texts]
        held = {t for t in asked if any(t in b for b in bags)}
        idf = {t: math.log(1.0 + store_size / (1 + store_df[t])) for t in asked}
        values = {
            "passage_cos": relevance(q.question, ps, embed),
            "sentence_cos": sent_cos,
            "margin": cos[0] - cos[min(4, len(cos) - 1)],
            "coverage_any": len(held) / len(asked) if asked else 1.0,
            "coverage_idf": (sum(idf[t] for t in held) / sum(idf.values())) if asked else 1.0,
            "coverage_local": coverage(q.question, ps),
            "coverage_best": max((len(asked & b) / len(asked) for b in bags), default=0.0)
            if asked else 1.0,
            "names_held": float(not missing_names(q.question, ps)),
            "rare_held": float(not missing_rare_words(q.question, ps)),
            "coverage_named": named_coverage(q.question, bags),
        }
        out.append(Signals(q, values))
    return out


def named_coverage(question: str, bags: Sequence[frozenset[str]]) -> float:
    from nest_core.focus import question_weights

    wanted = question_weights(question)
    n = len(bags)
    w = {t: v * math.log(1.0 + (n + 1) / (1 + sum(t <= b for b in bags)))
         for t, v in wanted.items()}
    total = sum(w.values())
    return sum(v for t, v in w.items() if any(t <= b for b in bags)) / total if total else 1.0


def rate(rows: Sequence[Signals], abstains: Callable[[dict[str, float]], bool]
         ) -> tuple[float, float]:
    un = [abstains(r.values) for r in rows if not r.q.answerable]
    ans = [abstains(r.values) for r in rows if r.q.answerable]
    return sum(un) / max(1, len(un)), sum(ans) / max(1, len(ans))


def meets(un: float, ans: float) -> str:
    return "yes" if un >= TARGET_UNANSWERABLE and ans <= CAP_ANSWERABLE else ""


def single_rules(signal: str, rows: dict[str, list[Signals]]) -> list[str]:
    """Each threshold at which the dev answerable rate stays within the cap, plus the one
    above it (the table shows where the signal runs out)."""
    dev = sorted({round(r.values[signal], 3) for r in rows["dev"]})
    lines: list[str] = []
    if any(math.isnan(r.values[signal]) for r in rows["dev"]):  # not computed
        return lines
    for t in [*dev, 1.01]:
        def below(v: dict[str, float], t: float = t) -> bool:
            return v[signal] < t
        un, ans = rate(rows["dev"], below)
        if ans > 2 * CAP_ANSWERABLE:
            break
        if un == 0.0:
            continue
        tu, ta = rate(rows["test"], below)
        lines.append(f"| {signal} < {t:.3f} | {un:.2f} / {ans:.2f} | {tu:.2f} / {ta:.2f} | "
                     f"{meets(un, ans)} | {meets(tu, ta)} |")
    return lines


def combined_rules(second: str, rows: dict[str, list[Signals]],
                   cos_grid: Sequence[float] = COS_GRID,
                   grid: Sequence[float] = COVERAGE_GRID) -> list[str]:
    lines: list[str] = []
    if any(math.isnan(r.values[second]) for r in rows["dev"]):  # not computed
        return lines
    held = {"names_held": "a name missing", "rare_held": "a rare word missing"}
    if second in held:
        grid = (1.0,)
    for a in cos_grid:
        for b in grid:
            def rule(v: dict[str, float], a: float = a, b: float = b) -> bool:
                return v["passage_cos"] < a or v[second] < b
            un, ans = rate(rows["dev"], rule)
            tu, ta = rate(rows["test"], rule)
            name = held.get(second, f"{second} < {b:.2f}")
            lines.append(f"| passage_cos < {a:.2f} or {name} | {un:.2f} / "
                         f"{ans:.2f} | {tu:.2f} / {ta:.2f} | {meets(un, ans)} | "
                         f"{meets(tu, ta)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signals", default="passage_cos,sentence_cos,margin,coverage_any,"
                    "coverage_idf,coverage_local,coverage_best,names_held,rare_held")
    ap.add_argument("--combine", default="rare_held,names_held,coverage_local,coverage_named,"
                    "coverage_idf,coverage_any,sentence_cos",
                    help="second signals tried with passage_cos (OR)")
    ap.add_argument("--dump", action="store_true", help="print every question's signals")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.debian_handbook import load_passages
    from benchmarks.search import open_stores
    from nest_core.focus import terms, titled
    from nest_core.stores.embeddings import default_embedding_function

    passages = load_passages()
    store_df: Counter[str] = Counter()
    for p in passages:
        store_df.update(terms(titled(p, p.text)))
    search = open_stores(passages, corpus="debian-handbook")["faiss"]
    embed = default_embedding_function()
    rows: dict[str, list[Signals]] = {}
    for split in ("dev", "test"):
        qs = [q for q in load_questions() if q.split == split]
        found = {q.id: list(search.search(q.question, NUM_PASSAGES).passages) for q in qs}
        rows[split] = compute(qs, found, embed, store_df, len(passages),
                              sentences="sentence_cos" in args.signals + args.combine)
    for split, rs in rows.items():
        un = sum(not r.q.answerable for r in rs)
        print(f"{split}: {len(rs)} questions, {un} unanswerable")
    if args.dump:
        for split, rs in rows.items():
            for r in sorted(rs, key=lambda r: (r.q.answerable, r.values["passage_cos"])):
                cells = " ".join(f"{k}={v:.2f}" for k, v in r.values.items())
                print(f"{split} {r.q.id} {r.q.shape:12s} {cells}  {r.q.question}")
    head = ["", ("| rule | dev: unanswerable / answerable | test: unanswerable / answerable "
                 "| dev meets | test meets |"), "|---|---|---|---|---|"]
    print("\n".join(head))
    for s in args.signals.split(","):
        print("\n".join(single_rules(s, rows)))
    for s in (s for s in args.combine.split(",") if s):
        print("\n".join(combined_rules(s, rows)))


if __name__ == "__main__":
    main()
