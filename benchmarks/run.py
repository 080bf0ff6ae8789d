"""Entry point: ``python -m benchmarks.run [--quick] [--tasks completion,qa,docqa]``
(``make bench`` / ``make bench-quick``).

Runs every system on the same test items, interleaved item by item (the system order rotates
per item, so drift in machine load hits every system alike), with a warm span datastore, then
writes ``benchmarks/results/bench[_quick].json``, ``summary.md``, ``quality_vs_speed.png`` and
(full runs of every task on the test split only) the tables between the ``bench`` markers of
``docs/benchmarks.md`` (never README.md: it names this command and links there). Tasks: FOLDOC
completion and acronym QA (``dict-foldoc``), document QA over the iso-codes tables
(``iso-codes``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import foldoc, isocodes
from benchmarks.report import (
    check_targets,
    docqa_table,
    markdown_table,
    plot,
    replace_marked_region,
    summarise,
    targets_markdown,
)
from benchmarks.systems import SYSTEMS, Runner, RunRecord
from benchmarks.tasks import (
    TASKS,
    Item,
    Split,
    Task,
    completion_items,
    docqa_items,
    qa_items,
    select,
)
from nest_core.config import BUNDLED_MODEL, MODEL_DEFAULTS

logger = logging.getLogger("benchmarks")
RESULTS = Path(__file__).parent / "results"
BENCH_DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"  # its bench region

# The core's defaults for the bundled SmolLM2-135M, calibrated on the dev split
# (benchmarks/calibrate.py, results/calibration.json; the paper's values started that sweep).
NEST_OVERRIDES: dict[str, Any] = {}  # paper_config() already holds the calibrated numbers
NUM_PASSAGES = int(MODEL_DEFAULTS[BUNDLED_MODEL]["num_passages"])  # b (the paper's 40 costs
# 12 s of encoding per cold query on 2 cores)


@dataclass(frozen=True)
class Plan:
    """What one run covers; ``--quick`` shrinks the item counts only, never the protocol."""

    completion_items: int
    qa_items: int
    docqa_items: int = 0
    completion_tokens: int = 64
    qa_tokens: int = 32
    docqa_tokens: int = 32  # "Answer in a few words": a code fits in a few tokens
    num_passages: int = NUM_PASSAGES
    split: Split = "test"
    tasks: tuple[Task, ...] = TASKS

    def count(self, task: Task) -> int:
        return int(getattr(self, f"{task}_items"))

    def tokens(self, task: Task) -> int:
        return int(getattr(self, f"{task}_tokens"))


QUICK = Plan(completion_items=6, qa_items=6, docqa_items=6)
FULL = Plan(completion_items=30, qa_items=30, docqa_items=60)
CORPUS_OF: dict[Task, str] = {"completion": "foldoc", "qa": "foldoc", "docqa": "iso-codes"}
PACKAGE_OF = {"foldoc": "dict-foldoc", "iso-codes": "iso-codes"}


def build_items(plan: Plan) -> list[Item]:
    split = plan.split  # "test": the table never sees the items calibration tuned on
    builders: dict[str, Callable[[], list[Item]]] = {
        "completion": completion_items, "qa": qa_items, "docqa": docqa_items}
    return [it for task in plan.tasks for it in select(builders[task](), split, plan.count(task))]


def missing_corpora(tasks: Sequence[Task]) -> str | None:
    """One line naming the missing files and the one apt command for every missing corpus,
    or None when all corpora the ``tasks`` need are installed."""
    checks = {"foldoc": foldoc.require_corpus, "iso-codes": isocodes.require_corpus}
    problems, packages = [], []
    for corpus in dict.fromkeys(CORPUS_OF[t] for t in tasks):
        try:
            checks[corpus]()
        except FileNotFoundError as err:
            problems.append(str(err).split(";")[0])
            packages.append(PACKAGE_OF[corpus])
    if not problems:
        return None
    return (f"benchmarks: {'; '.join(problems)}. Install with: apt-get update && apt-get "
            f"install -y {' '.join(packages)} (as root; `make bench` does it)")


def corpus_passages(corpus: str) -> tuple[Any, ...]:
    return foldoc.load_passages() if corpus == "foldoc" else isocodes.load_passages()


def open_search(passages: Sequence[Any], corpus: str = "foldoc") -> dict[str, Any]:
    """FAISS (the passages every system gets) and Chroma (timed alongside, same corpus)."""
    from benchmarks.search import open_stores

    return open_stores(passages, corpus=corpus)


def run_items(runner: Mapping[str, Runner], stores: Mapping[str, Mapping[str, Any]],
              items: Sequence[Item], plan: Plan, systems: Sequence[str]) -> list[RunRecord]:
    """Retrieve, warm the datastore (untimed), then run all systems on each item in turn.
    ``stores`` maps each task to its corpus's stores."""
    from benchmarks.tasks import is_gold_passage

    records: list[RunRecord] = []
    for n, item in enumerate(items):
        found = stores[item.task]["faiss"].search(item.query, plan.num_passages)
        chroma = stores[item.task]["chroma"].search(item.query, plan.num_passages)
        run = runner[item.task]
        if any(s != "base" for s in systems):
            run.warm(found.passages)
        order = [systems[(n + k) % len(systems)] for k in range(len(systems))]
        for system in order:
            rec = run.run(system, item, found.passages, found.seconds)
            rec.extra["chroma_search_seconds"] = chroma.seconds
            rec.extra["chroma_same_top3"] = ([p.text for p in chroma.passages[:3]]
                                             == [p.text for p in found.passages[:3]])
            if item.gold_passage:
                rec.extra["gold_retrieved"] = any(is_gold_passage(p, item.gold_passage)
                                                  for p in found.passages)
            records.append(rec)
        logger.info("%d/%d %s: %s", n + 1, len(items), item.key, "  ".join(
            f"{r.system}={r.quality:.2f}@{r.tokens_per_second:.1f}t/s"
            for r in records[-len(systems):]))
    return records


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="6+6+6 test items instead of 30+30+60")
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--no-docs", "--no-readme", dest="no_docs", action="store_true",
                    help="do not touch docs/benchmarks.md (--no-readme: the old name)")
    ap.add_argument("--items", type=int, nargs="+", metavar="N",
                    help="items per task: one number for every task, or one per selected "
                         "task in the order completion, qa, docqa")
    ap.add_argument("--split", choices=("test", "dev"), default="test",
                    help="test (the table's) or dev (for checks; never written to docs/)")
    ap.add_argument("--passages", type=int, default=NUM_PASSAGES, help="passages per query (b)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 is faster on a crowded machine)")
    args = ap.parse_args(argv)
    tasks = tuple(t for t in TASKS if t in args.tasks.split(","))
    unknown = set(args.tasks.split(",")) - set(TASKS) - {""}
    if unknown or not tasks:
        ap.error(f"--tasks: unknown {sorted(unknown)}; choose from {','.join(TASKS)}")
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS) or not systems:
        ap.error(f"--systems: choose from {','.join(SYSTEMS)}")
    plan = replace(QUICK if args.quick else FULL, tasks=tasks, split=args.split,
                   num_passages=args.passages)
    if args.items:
        if len(args.items) not in (1, len(tasks)):
            ap.error(f"--items: give 1 or {len(tasks)} numbers for tasks {','.join(tasks)}")
        counts = args.items * len(tasks) if len(args.items) == 1 else args.items
        plan = replace(plan, **{f"{t}_items": c for t, c in zip(tasks, counts, strict=True)})
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("benchmarks").setLevel(logging.INFO)  # progress, not library chatter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    problem = missing_corpora(tasks)
    if problem:
        sys.exit(problem)  # one line on stderr, exit status 1, no traceback
    t0 = time.perf_counter()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from nest_core import load_model
    from nest_core.models import cache_dir
    from nest_core.stores.datastore import SpanDatastore

    corpora = list(dict.fromkeys(CORPUS_OF[t] for t in tasks))
    passages = {c: corpus_passages(c) for c in corpora}
    corpus_stores = {c: open_search(passages[c], c) for c in corpora}
    stores: dict[str, dict[str, Any]] = {t: corpus_stores[CORPUS_OF[t]] for t in tasks}
    lm = load_model()
    store = SpanDatastore(cache_dir() / "bench" / "spans")
    runner: dict[str, Runner] = {
        t: Runner(lm, store, max_new_tokens=plan.tokens(t), nest_overrides=NEST_OVERRIDES)
        for t in tasks}
    items = build_items(plan)
    setup_s = time.perf_counter() - t0
    # One untimed pass over the first item so lazy initialisation is not billed to anyone.
    run_items(runner, stores, items[:1], plan, systems)
    records = run_items(runner, stores, items, plan, systems)
    rows = summarise(records)
    meta = {"plan": {**vars(plan), "tasks": list(plan.tasks)}, "systems": systems,
            "nest_overrides": NEST_OVERRIDES,
            "model": lm.name, "dtype": str(lm.dtype), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(),
            "search": next(iter(corpus_stores.values()))["faiss"].name,
            "chroma_search_ms_median": 1000 * statistics.median(
                r.extra["chroma_search_seconds"] for r in records),
            "faiss_search_ms_median": 1000 * statistics.median(
                [r.search_seconds for r in records if r.system != "base"] or [0.0]),
            "corpus_passages": {c: len(ps) for c, ps in passages.items()},
            "setup_seconds": round(setup_s, 1),
            "run_seconds": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None
                                                               else sys.argv[1:])])}
    write_outputs(rows, records, meta, quick=args.quick, docs=not args.no_docs)


def output_suffix(plan: dict[str, Any], quick: bool) -> str:
    """``""`` for the canonical run (every task, test split); else names what differs, so a
    partial or dev run never overwrites the full results."""
    suffix = "_quick" if quick else ""
    if list(plan["tasks"]) != list(TASKS):
        suffix += "_" + "-".join(plan["tasks"])
    if plan["split"] != "test":
        suffix += f"_{plan['split']}"
    return suffix


def caption_for(meta: dict[str, Any]) -> str:
    plan = meta["plan"]
    counts = " + ".join(f"{plan[f'{t}_items']} {t}" for t in plan["tasks"])
    tokens = "/".join(str(plan[f"{t}_tokens"]) for t in plan["tasks"])
    corpora = " and ".join(dict.fromkeys(
        {"foldoc": "FOLDOC", "iso-codes": "iso-codes"}[CORPUS_OF[t]] for t in plan["tasks"]))
    return (f"{corpora} {plan['split']} split, {counts} items, {meta['model']} {meta['dtype']}, "
            f"greedy, {tokens} new tokens, "
            f"{plan['num_passages']} passages ({meta['search']}), warm span datastore, "
            f"{meta['threads']} threads, {meta['date']}; load average at the end "
            f"{meta['load_average'][0]:.1f}. tok/s, s/answer and 'vs base' are medians over "
            f"items (systems interleaved per item). Produced by `{meta['command']}`.")


def write_outputs(rows: Any, records: Sequence[RunRecord], meta: dict[str, Any], *,
                  quick: bool, docs: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = output_suffix(meta["plan"], quick)
    name = f"bench{suffix}"
    targets = check_targets(rows)
    payload = {"meta": meta, "summary": [r.to_dict() for r in rows],
               "targets": [vars(t) for t in targets],
               "records": [{**r.to_dict(), "text": r.text[:400]} for r in records]}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False)
                                          + "\n", encoding="utf-8")
    table = markdown_table(rows)
    doc_table = docqa_table(rows)
    doc_section = (f"#### Document QA with gold passages (iso-codes)\n\n{doc_table}\n\n"
                   if doc_table else "")
    caption = caption_for(meta)
    (RESULTS / f"summary{suffix}.md").write_text(
        f"# Benchmark summary\n\n{caption}\n\n{table}\n\n{doc_section}"
        f"## Targets (issue 6)\n\n{targets_markdown(targets)}\n", encoding="utf-8")
    if not quick:
        plot(rows, RESULTS / f"quality_vs_speed{suffix}.png")
        if docs and not suffix:
            # the plot's path as the doc links it, relative to the doc's folder
            png = Path(os.path.relpath(RESULTS / "quality_vs_speed.png", BENCH_DOC.parent))
            replace_marked_region(BENCH_DOC, f"### Benchmark (FOLDOC, iso-codes)\n\n{caption}\n\n"
                                  f"{table}\n\n{doc_section}"
                                  f"![quality vs speed]({png.as_posix()})")
    print(table)
    if doc_table:
        print(f"\n{doc_table}")


if __name__ == "__main__":
    main()
