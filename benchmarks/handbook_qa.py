"""Doc-QA on prose: questions in users' own words on the Debian Administrator's Handbook.

Questions of every shape a user asks (lookups, paraphrases, yes/no, how many, lists, two facts
in one, why) and questions the book does not answer, written by hand and checked against the
text (``benchmarks/data/debian_handbook_qa/*.json``; every answer string occurs in a gold
passage, :func:`check_questions`). Split dev/test by a hash of the question id: calibration
sees ``dev`` only. Systems share the model, the store's passages (FAISS, the store's 200
nearest re-ranked by the question's words, as ``nest ask`` retrieves), greedy decoding and
the token budget, and run interleaved per question (the order rotates).

Metrics, per system: **right** (answerable questions: every answer group found in the
output as a whole token, yes/no: its first "yes" or "no"), **cited-right** (right, and each
answer group inside a citation, ``NestResult.cited_spans()``, of a gold passage; yes/no: a
citation of a gold passage), **cited-wrong** (share of all answers that are wrong, or answer
an unanswerable question, and still carry a citation: the worst outcome), **abstained**
on unanswerable and on answerable questions (the result's
``finish_reason == "abstained"``, or a baseline saying it does not know), seconds per answer.

Run: ``python -m benchmarks.handbook_qa [--split dev] [--items N] [--systems ...]
[--dtype bfloat16]``
(``make bench`` installs ``debian-handbook``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.isocodes import answer_pattern
from benchmarks.tasks import is_gold_passage

logger = logging.getLogger(__name__)

DATA = Path(__file__).parent / "data" / "debian_handbook_qa"
RESULTS = Path(__file__).parent / "results"
SHAPES = ("lookup", "paraphrase", "yesno", "count", "list", "two-facts", "why", "unanswerable")
SYSTEMS = ("base", "rag", "rag+lookup", "default", "default-whole")
LABELS = {"base": "Base LM", "rag": "In-context RAG (top-3)", "rag+lookup": "RAG + prompt lookup",
          "default": "Nest, shipped default", "default-whole": "default, top-3 passages whole"}
MAX_NEW_TOKENS = 64
NUM_PASSAGES = 10
_DONT_KNOW = re.compile(r"\b(do(es)? not (say|mention|contain|specify)|doesn't (say|mention)|"
                        r"not (mentioned|specified|stated)|no information|i don't know|"
                        r"i do not know|cannot (find|answer))\b", re.IGNORECASE)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    shape: str
    answers: tuple[tuple[str, ...], ...]  # every group must be found; any spelling in one
    gold: tuple[str, ...]  # passage ids holding the answer (none: unanswerable)

    @property
    def answerable(self) -> bool:
        return self.shape != "unanswerable"

    @property
    def split(self) -> str:
        return "dev" if int(hashlib.sha1(self.id.encode()).hexdigest(), 16) % 2 == 0 else "test"


def load_questions(folder: Path = DATA) -> list[Question]:
    out = []
    for path in sorted(folder.glob("*.json")):
        for q in json.loads(path.read_text(encoding="utf-8")):
            out.append(Question(q["id"], q["question"], q["shape"],
                                tuple(tuple(g) for g in q["answers"]), tuple(q["gold"])))
    return out


def check_questions(questions: Sequence[Question], passages: Sequence[Any]) -> list[str]:
    """Problems with the question file: unknown shapes or gold ids, answers missing from
    their gold passages (whitespace collapsed, case-insensitive)."""
    by_id = {p.id: p for p in passages}
    problems = []
    for q in questions:
        if q.shape not in SHAPES:
            problems.append(f"{q.id}: unknown shape {q.shape!r}")
        if q.answerable != bool(q.gold):
            problems.append(f"{q.id}: gold passages must be given exactly when answerable")
        if any(g not in by_id for g in q.gold):
            problems.append(f"{q.id}: unknown gold passage in {q.gold}")
            continue
        if q.shape == "yesno":
            if q.answers not in ((("yes",),), (("no",),)):
                problems.append(f"{q.id}: a yes/no answer is [['yes']] or [['no']]")
            continue
        text = " ".join(" ".join(by_id[g].text for g in q.gold).lower().split())
        for group in q.answers:
            if not any(" ".join(a.lower().split()) in text for a in group):
                problems.append(f"{q.id}: no spelling of {group} in {q.gold}")
    return problems


# --- metrics --------------------------------------------------------------------------------
def yes_or_no(text: str) -> str:
    """The output's first "yes" or "no" (as a word), or ``""``."""
    m = re.search(r"\b(yes|no)\b", text, re.IGNORECASE)
    return m.group(0).lower() if m else ""


def is_right(q: Question, text: str, abstained: bool) -> bool:
    if not q.answerable:
        return abstained
    if abstained:
        return False
    if q.shape == "yesno":
        return yes_or_no(text) == q.answers[0][0]
    return all(any(answer_pattern(a).search(text) for a in group) for group in q.answers)


def is_cited_right(q: Question, text: str, spans: Sequence[Any]) -> bool:
    """Right, and each answer group's occurrence inside one span cut from a gold passage
    (yes/no: some span of a gold passage)."""
    gold = [s for s in spans if any(is_gold_passage(s.passage, g) for g in q.gold)]
    if not gold:
        return False
    if q.shape == "yesno":
        return True
    return all(any(s.out_start <= m.start() and m.end() <= s.out_end
                   for a in group for m in answer_pattern(a).finditer(text) for s in gold)
               for group in q.answers)


@dataclass
class Record:
    system: str
    id: str
    shape: str
    text: str
    right: bool
    cited_right: bool
    abstained: bool
    seconds: float
    tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


def summarise(records: Sequence[Record], questions: dict[str, Question]) -> dict[str, Any]:
    by_system: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_system[r.system].append(r)
    out = {}
    for system, rs in by_system.items():
        answerable = [r for r in rs if questions[r.id].answerable]
        unanswerable = [r for r in rs if not questions[r.id].answerable]
        right = [r for r in answerable if r.right]
        out[system] = {
            "items": len(rs),
            "right": len(right) / max(1, len(answerable)),
            "cited_right": sum(r.cited_right for r in right) / max(1, len(answerable)),
            "cited_share_of_right": sum(r.cited_right for r in right) / max(1, len(right)),
            "abstain_unanswerable": sum(r.abstained for r in unanswerable)
            / max(1, len(unanswerable)),
            "abstain_answerable": sum(r.abstained for r in answerable) / max(1, len(answerable)),
            # the worst outcome: a wrong answer (or one to an unanswerable question) that
            # carries a citation, as a share of all answers
            "cited_wrong": sum(not r.right and bool(r.extra.get("cited")) for r in rs)
            / max(1, len(rs)),
            "seconds_per_answer": statistics.mean(r.seconds for r in rs),
            "right_by_shape": {s: round(sum(r.right for r in rs if r.shape == s)
                                        / max(1, sum(r.shape == s for r in rs)), 3)
                               for s in SHAPES if any(r.shape == s for r in rs)},
        }
    return out


def table(summary: dict[str, Any]) -> str:
    head = ("| System | Right | Cited-right | Cited-wrong | Abstained: unanswerable / "
            "answerable | s/answer |\n|---|---:|---:|---:|---|---:|")
    rows = [f"| {LABELS.get(s, s)} | {m['right']:.3f} | {m['cited_right']:.3f} | "
            f"{m.get('cited_wrong', 0.0):.3f} | "
            f"{m['abstain_unanswerable']:.2f} / {m['abstain_answerable']:.2f} | "
            f"{m['seconds_per_answer']:.2f} |" for s, m in summary.items()]
    shapes = [s for s in SHAPES if any(s in m["right_by_shape"] for m in summary.values())]
    by_shape = ["", "| System | " + " | ".join(shapes) + " |",
                "|---|" + "---:|" * len(shapes)]
    by_shape += [f"| {LABELS.get(s, s)} | " + " | ".join(
        f"{m['right_by_shape'].get(sh, 0):.2f}" for sh in shapes) + " |"
        for s, m in summary.items()]
    return "\n".join([head, *rows, *by_shape])


# --- running ---------------------------------------------------------------------------------
def decoders(lm: Any, key_cache: Any, systems: Sequence[str],
             batching: bool = False) -> dict[str, Any]:
    """A decoder per system; ``default:name=value,...`` is the default with overrides
    (values as Python literals), for measuring a setting on dev; ``batching``: each decodes
    through the model's batcher (as ``nest serve --batching`` does)."""
    import ast

    from nest_core import NestConfig, NestDecoder
    from nest_core.config import default_config
    from nest_core.stores.embeddings import default_embedding_function

    configs = {"base": NestConfig(mode="base"),
               "rag": NestConfig(mode="base", passages_in_prompt=True),
               "default": default_config(lm.name),
               "default-whole": default_config(lm.name, focus_sentences=None)}
    for s in systems:
        if s.startswith("default:"):
            pairs = (kv.split("=", 1) for kv in s.split(":", 1)[1].split(";"))
            configs[s] = default_config(lm.name, **{k: ast.literal_eval(v) for k, v in pairs})
    embed = default_embedding_function()  # the abstention's evidence, as every surface has
    return {s: NestDecoder(lm, configs[s], key_cache=key_cache, embed=embed, batching=batching)
            for s in systems if s in configs}


def answer(system: str, decs: dict[str, Any], lookup: Any, q: Question,
           passages: list[Any], search_seconds: float) -> Record:
    if system == "rag+lookup":
        from benchmarks.tasks import Item

        item = Item(task="docqa", key=q.id, prompt=q.question, query=q.question,
                    references=(), entry_index=0)
        rec = lookup.run(item, passages[:3], MAX_NEW_TOKENS)
        text, spans, finish = rec.text, [], "length"
        seconds, tokens = rec.total_seconds + search_seconds, rec.generated_tokens
    else:
        res = decs[system].generate(q.question, passages if system != "base" else None,
                                    max_new_tokens=MAX_NEW_TOKENS)
        text, spans, finish = res.text, res.cited_spans(), res.finish_reason
        seconds = res.stats.total_seconds + (search_seconds if system != "base" else 0.0)
        tokens = res.stats.generated_tokens
    abstained = finish == "abstained" or bool(_DONT_KNOW.search(text))
    right = is_right(q, text, abstained)
    return Record(system=system, id=q.id, shape=q.shape, text=text, right=right,
                  cited_right=right and q.answerable and is_cited_right(q, text, spans),
                  abstained=abstained, seconds=seconds, tokens=tokens,
                  extra={"support": support(decs, system, q, text, passages),
                         "cited": bool(spans)})


def support(decs: dict[str, Any], system: str, q: Question, text: str,
            passages: list[Any]) -> float:
    """The answer's support by the context the system showed
    (:func:`nest_core.grounding.answer_support`; calibration material)."""
    from nest_core.decoding.policy import context
    from nest_core.grounding import answer_support

    if system == "base":
        shown: list[Any] = []
    elif system in decs:
        shown = context(decs[system].config, q.question, q.question, passages).shown
    else:
        shown = passages[:3]
    return answer_support(q.question, text, shown) if shown else 0.0


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("dev", "test"), default="test")
    ap.add_argument("--items", type=int, default=0, help="at most this many (0: all)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated; default:name=value;... measures an override")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="results file stem (default: handbook-<split>)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the model's dtype, for every system")
    ap.add_argument("--batching", action="store_true",
                    help="decode as a batching server's lone answers do (nest serve --batching)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from benchmarks.debian_handbook import load_passages
    from benchmarks.search import open_stores
    from benchmarks.systems import PromptLookup
    from nest_core import load_model
    from nest_core.grounding import relevance
    from nest_core.models import cache_dir
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.embeddings import default_embedding_function

    torch.set_num_threads(args.threads)
    passages = load_passages()
    questions = load_questions()
    problems = check_questions(questions, passages)
    if problems:
        raise SystemExit("question file problems:\n" + "\n".join(problems))
    chosen = [q for q in questions if q.split == args.split]
    chosen = chosen[:args.items] if args.items else chosen
    search = open_stores(passages, corpus="debian-handbook")["faiss"]
    lm = load_model(dtype=args.dtype)
    store = SpanDatastore(cache_dir() / "bench" / "spans")
    systems = [s for s in args.systems.split(",") if s]
    decs = decoders(lm, store, systems, batching=args.batching)
    lookup = PromptLookup(lm)
    embed = default_embedding_function()
    for dec in decs.values():
        dec.generate("Hello", max_new_tokens=2)  # one-off set-up, untimed
    records: list[Record] = []
    for n, q in enumerate(chosen):
        t0 = time.perf_counter()
        found = search.search(q.question, NUM_PASSAGES)
        if "default" in decs:
            decs["default"].prepare(found.passages)  # a warm span datastore, untimed
        # per question, the same for every system: the abstention's other evidence
        shared = {"relevance": relevance(q.question, found.passages, embed),
                  "gold_retrieved": any(is_gold_passage(p, g) for p in found.passages
                                        for g in q.gold)}
        order = [systems[(n + k) % len(systems)] for k in range(len(systems))]
        for system in order:
            rec = answer(system, decs, lookup, q, list(found.passages), found.seconds)
            rec.extra.update(shared)
            records.append(rec)
        logger.info("%d/%d %s (%s, %.0fs): %s", n + 1, len(chosen), q.id, q.shape,
                    time.perf_counter() - t0, "  ".join(
                        f"{r.system}={'R' if r.right else '-'}{'C' if r.cited_right else ''}"
                        f"{'A' if r.abstained else ''}" for r in records[-len(systems):]))
    summary = summarise(records, {q.id: q for q in chosen})
    stem = args.out or f"handbook-{args.split}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"split": args.split, "items": len(chosen), "summary": summary,
         "records": [asdict(r) for r in records]}, indent=1))
    (RESULTS / f"{stem}.md").write_text(table(summary) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()
