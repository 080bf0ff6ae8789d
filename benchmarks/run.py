"""Entry point: ``python -m benchmarks.run [--quick]`` (``make bench`` / ``make bench-quick``).

Runs every system on the same test items, interleaved item by item (the system order rotates
per item, so drift in machine load hits every system alike), with a warm span datastore, then
writes ``benchmarks/results/bench[_quick].json``, ``summary.md``, ``quality_vs_speed.png`` and
(full runs only) the README table between the ``bench`` markers.
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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.foldoc import load_passages, require_corpus
from benchmarks.report import (
    check_targets,
    markdown_table,
    plot,
    replace_readme_region,
    summarise,
    targets_markdown,
)
from benchmarks.systems import SYSTEMS, Runner, RunRecord
from benchmarks.tasks import Item, completion_items, qa_items, select
from nest_core.config import BUNDLED_MODEL, MODEL_DEFAULTS

logger = logging.getLogger("benchmarks")
RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "README.md"

# The core's defaults for the bundled SmolLM2-135M, calibrated on the dev split
# (benchmarks/calibrate.py, results/calibration.json; the paper's values started that sweep).
NEST_OVERRIDES: dict[str, Any] = {
    k: v for k, v in MODEL_DEFAULTS[BUNDLED_MODEL].items() if k != "num_passages"}
NUM_PASSAGES = int(MODEL_DEFAULTS[BUNDLED_MODEL]["num_passages"])  # b (the paper's 40 costs
# 12 s of encoding per cold query on 2 cores)


@dataclass(frozen=True)
class Plan:
    """What one run covers; ``--quick`` shrinks the item counts only, never the protocol."""

    completion_items: int
    qa_items: int
    completion_tokens: int = 64
    qa_tokens: int = 32
    num_passages: int = NUM_PASSAGES
    split: str = "test"


QUICK = Plan(completion_items=6, qa_items=6)
FULL = Plan(completion_items=30, qa_items=30)


def build_items(plan: Plan) -> list[Item]:
    split = plan.split  # "test": the table never sees the items calibration tuned on
    return (select(completion_items(), split, plan.completion_items)  # type: ignore[arg-type]
            + select(qa_items(), split, plan.qa_items))  # type: ignore[arg-type]


def open_search(passages: Sequence[Any]) -> dict[str, Any]:
    """FAISS (the passages every system gets) and Chroma (timed alongside, same corpus)."""
    from benchmarks.search import open_stores

    return open_stores(passages)


def run_items(runner: dict[str, Runner], stores: dict[str, Any], items: Sequence[Item],
              plan: Plan, systems: Sequence[str]) -> list[RunRecord]:
    """Retrieve, warm the datastore (untimed), then run all systems on each item in turn."""
    records: list[RunRecord] = []
    for n, item in enumerate(items):
        found = stores["faiss"].search(item.query, plan.num_passages)
        chroma = stores["chroma"].search(item.query, plan.num_passages)
        run = runner[item.task]
        run.warm(found.passages)
        order = [systems[(n + k) % len(systems)] for k in range(len(systems))]
        for system in order:
            rec = run.run(system, item, found.passages, found.seconds)
            rec.extra["chroma_search_seconds"] = chroma.seconds
            rec.extra["chroma_same_top3"] = ([p.text for p in chroma.passages[:3]]
                                             == [p.text for p in found.passages[:3]])
            records.append(rec)
        logger.info("%d/%d %s: %s", n + 1, len(items), item.key, "  ".join(
            f"{r.system}={r.quality:.2f}@{r.tokens_per_second:.1f}t/s"
            for r in records[-len(systems):]))
    return records


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6+6 items (< 10 min on 2 cores)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    ap.add_argument("--items", type=int, nargs=2, metavar=("COMPLETION", "QA"),
                    help="override the number of test items per task")
    ap.add_argument("--passages", type=int, default=NUM_PASSAGES, help="passages per query (b)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 is faster on a crowded machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("benchmarks").setLevel(logging.INFO)  # progress, not library chatter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    require_corpus()
    plan = QUICK if args.quick else FULL
    if args.items:
        plan = replace(plan, completion_items=args.items[0], qa_items=args.items[1])
    plan = replace(plan, num_passages=args.passages)
    systems = [s for s in args.systems.split(",") if s]
    t0 = time.perf_counter()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from nest_core import load_model
    from nest_core.datastore import SpanDatastore
    from nest_core.models import cache_dir

    passages = load_passages()
    stores = open_search(passages)
    lm = load_model()
    store = SpanDatastore(cache_dir() / "bench" / "spans")
    runner = {"completion": Runner(lm, store, max_new_tokens=plan.completion_tokens,
                                   nest_overrides=NEST_OVERRIDES),
              "qa": Runner(lm, store, max_new_tokens=plan.qa_tokens,
                           nest_overrides=NEST_OVERRIDES)}
    items = build_items(plan)
    setup_s = time.perf_counter() - t0
    # One untimed pass over the first item so lazy initialisation is not billed to anyone.
    run_items(runner, stores, items[:1], plan, systems)
    records = run_items(runner, stores, items, plan, systems)
    rows = summarise(records)
    meta = {"plan": vars(plan), "systems": systems, "nest_overrides": NEST_OVERRIDES,
            "model": lm.name, "dtype": str(lm.dtype), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(), "search": stores["faiss"].name,
            "chroma_search_ms_median": 1000 * statistics.median(
                r.extra["chroma_search_seconds"] for r in records),
            "faiss_search_ms_median": 1000 * statistics.median(
                r.search_seconds for r in records if r.system != "base"),
            "corpus_passages": len(passages), "setup_seconds": round(setup_s, 1),
            "run_seconds": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None
                                                               else sys.argv[1:])])}
    write_outputs(rows, records, meta, quick=args.quick, readme=not args.no_readme)


def write_outputs(rows: Any, records: Sequence[RunRecord], meta: dict[str, Any], *,
                  quick: bool, readme: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "bench_quick" if quick else "bench"
    targets = check_targets(rows)
    payload = {"meta": meta, "summary": [r.to_dict() for r in rows],
               "targets": [vars(t) for t in targets],
               "records": [{**r.to_dict(), "text": r.text[:400]} for r in records]}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False)
                                          + "\n", encoding="utf-8")
    table = markdown_table(rows)
    plan = meta["plan"]
    caption = (f"FOLDOC test split, {plan['completion_items']} completion + {plan['qa_items']} "
               f"QA items, {meta['model']} {meta['dtype']}, greedy, "
               f"{plan['completion_tokens']}/{plan['qa_tokens']} new tokens, "
               f"{plan['num_passages']} passages ({meta['search']}), warm span datastore, "
               f"{meta['threads']} threads, {meta['date']}; load average at the end "
               f"{meta['load_average'][0]:.1f}. tok/s and 'vs base' are medians over items "
               f"(systems interleaved per item). Produced by `{meta['command']}`.")
    (RESULTS / ("summary_quick.md" if quick else "summary.md")).write_text(
        f"# Benchmark summary\n\n{caption}\n\n{table}\n\n## Targets (issue 6)\n\n"
        f"{targets_markdown(targets)}\n", encoding="utf-8")
    if not quick:
        plot(rows, RESULTS / "quality_vs_speed.png")
        if readme:
            replace_readme_region(README, f"### Benchmark (FOLDOC)\n\n{caption}\n\n{table}\n\n"
                                  "![quality vs speed](benchmarks/results/quality_vs_speed.png)")
    print(table)


if __name__ == "__main__":
    main()
