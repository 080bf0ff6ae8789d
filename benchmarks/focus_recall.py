"""Focus recall: does the context the prompt shows hold the answer? No LM needed.

For each answerable handbook question (``benchmarks/handbook_qa.py``'s questions, the same
retrieval), the share whose every answer group occurs in the ``k`` best focus sentences
(:func:`nest_core.focus.best_sentences`), per question shape, for each sentence splitter
and stemmer variant and each ``k``. A right answer needs its words in what the LM reads: this
measures the focus alone, in seconds, where the doc-QA benchmark takes minutes per system.

Variants (``--variants``): ``shipped`` (what nest_core.focus does now), ``plain-regex``
(sentence ends at ``. ! ?`` + space or a line break, the focus before abbreviations were
known), ``pysbd`` (the pysbd segmenter inside each line, when installed), ``crude-stem``
(the suffix stripper before Snowball).

Run: ``python -m benchmarks.focus_recall [--split dev] [--k 1,2,3]``
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from benchmarks.handbook_qa import NUM_PASSAGES, SHAPES, load_questions
from benchmarks.isocodes import answer_pattern
from nest_core import focus

_PLAIN_END = re.compile(r"\n+|(?<=[.!?])\s+")


def plain_regex(text: str) -> list[tuple[int, int]]:
    out, pos = [], 0
    for m in [*_PLAIN_END.finditer(text), None]:
        end = m.start() if m else len(text)
        chunk = text[pos:end]
        lead = len(chunk) - len(chunk.lstrip())
        if chunk.strip():
            out.append((pos + lead, pos + len(chunk.rstrip())))
        if m:
            pos = m.end()
    return out


def pysbd_split(text: str) -> list[tuple[int, int]]:
    import pysbd

    seg = pysbd.Segmenter(language="en", clean=False, char_span=True)
    out = []
    for line in re.finditer(r"[^\n]+", text):
        for s in seg.segment(line.group()):
            a = line.start() + s.start
            b = line.start() + s.start + len(s.sent.rstrip())
            a += len(text[a:b]) - len(text[a:b].lstrip())
            if b > a:
                out.append((a, b))
    return out


def crude_stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """nest_core.focus with one part swapped (benchmark only; caches cleared around it)."""
    saved = focus.split_sentences, focus.stem
    swaps: dict[str, dict[str, Callable[..., Any]]] = {
        "shipped": {}, "plain-regex": {"split_sentences": plain_regex},
        "pysbd": {"split_sentences": functools.lru_cache(maxsize=4096)(pysbd_split)},
        "crude-stem": {"stem": functools.lru_cache(maxsize=1 << 16)(crude_stem)}}
    for attr, fn in swaps[name].items():
        setattr(focus, attr, fn)
    focus.terms.cache_clear()
    try:
        yield
    finally:
        focus.split_sentences, focus.stem = saved
        focus.terms.cache_clear()


def meaning_scores(question: str, passages: Sequence[Any], embed: Any
                   ) -> list[tuple[float, float, focus.Sentence]]:
    """Every sentence with its lexical score scaled to [0, 1] and its cosine to the
    question (embedded once; the weights are tried on these)."""
    import numpy as np

    ranked = focus.rank_sentences(question, passages)
    top = max((s.score for s in ranked), default=0.0) or 1.0
    texts = [focus.titled(passages[s.passage_index],
                          passages[s.passage_index].text[s.start:s.end]) for s in ranked]
    vecs = np.asarray(embed([question, *texts]), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-9)
    cos = vecs[1:] @ vecs[0]
    return [(s.score / top, float(c), s) for s, c in zip(ranked, cos, strict=True)]


def holds_answer(q: Any, text: str) -> bool:
    return all(any(answer_pattern(a).search(text) for a in group) for group in q.answers)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("dev", "test"), default="dev")
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--variants", default="shipped,plain-regex,pysbd,crude-stem")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.debian_handbook import load_passages
    from benchmarks.search import open_stores

    passages = load_passages()
    questions = [q for q in load_questions() if q.split == args.split and q.answerable
                 and q.shape != "yesno"]  # a yes/no answer is not a string in the text
    search = open_stores(passages, corpus="debian-handbook")["faiss"]
    found = {q.id: list(search.search(q.question, NUM_PASSAGES).passages) for q in questions}
    ks = [int(k) for k in args.k.split(",")]
    print(f"focus recall, {args.split}: {len(questions)} answerable questions (yes/no aside)")
    shapes = [s for s in SHAPES if any(q.shape == s for q in questions)]
    print("| variant | k | all | " + " | ".join(shapes) + " |")
    embed, scored = None, {}
    for name in args.variants.split(","):
        if name.startswith("meaning"):
            from nest_core.stores.embeddings import default_embedding_function

            embed = embed or default_embedding_function()
            scored = scored or {q.id: meaning_scores(q.question, found[q.id], embed)
                                for q in questions}
            weight = float(name.split(":")[1])
            for k in ks:
                hits = defaultdict(list)
                for q in questions:
                    ps = found[q.id]
                    ranked = sorted(scored[q.id], key=lambda x: -(x[0] + weight * x[1]))
                    text = "\n".join(ps[s.passage_index].text[s.start:s.end]
                                     for _, _, s in ranked[:k])
                    hits[q.shape].append(holds_answer(q, text))
                    hits["all"].append(hits[q.shape][-1])
                cells = [f"{sum(hits[s]) / len(hits[s]):.2f}" for s in shapes]
                print(f"| {name} | {k} | {sum(hits['all']) / len(hits['all']):.2f} | "
                      + " | ".join(cells) + " |", flush=True)
            continue
        with variant(name):
            for k in ks:
                hits: dict[str, list[bool]] = defaultdict(list)
                for q in questions:
                    ps = found[q.id]
                    best = focus.best_sentences(q.question, ps, k)
                    text = "\n".join(ps[s.passage_index].text[s.start:s.end] for s in best)
                    hits[q.shape].append(holds_answer(q, text))
                    hits["all"].append(hits[q.shape][-1])
                cells = [f"{sum(hits[s]) / len(hits[s]):.2f}" for s in shapes]
                print(f"| {name} | {k} | {sum(hits['all']) / len(hits['all']):.2f} | "
                      + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
