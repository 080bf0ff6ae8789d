"""N requests at once on one loaded model: are answers unchanged, what are throughput and
latency? ``python -m benchmarks.bench_concurrency [--items 8] [--levels 1 2 4 8]``

Each level N runs the same doc-QA dev questions (shipped default, warm span datastore) from
N threads sharing one :class:`~nest_core.NestDecoder`; every answer is compared token for
token with the same question answered alone (level 1). Writes
``results/concurrency.json`` and ``results/concurrency.png`` (answers per second and p50/p95
seconds per answer against N). A figure, not a timed test: on a 2-core CPU, N > 2 threads
share two cores, so throughput flattens and latency grows with N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from benchmarks.run import (
        CORPUS_OF,
        FULL,
        NUM_PASSAGES,
        build_items,
        corpus_passages,
        open_search,
    )
    from nest_core import NestDecoder, load_model
    from nest_core.models import cache_dir
    from nest_core.stores.datastore import SpanDatastore

    if args.threads:
        torch.set_num_threads(args.threads)
    plan = FULL.__class__(**{**vars(FULL), "tasks": ("docqa",), "split": "dev",
                             "docqa_items": args.items})
    items = build_items(plan)
    stores = open_search(corpus_passages(CORPUS_OF["docqa"]), CORPUS_OF["docqa"])
    found = [stores["faiss"].search(it.query, NUM_PASSAGES).passages for it in items]
    lm = load_model()
    decoder = NestDecoder(lm, key_cache=SpanDatastore(cache_dir() / "bench" / "spans"))
    tokens = plan.tokens("docqa")
    for ps in found:
        decoder.prepare(ps)  # warm keys: the levels compare decoding, not encoding

    def answer(i: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        res = decoder.generate(items[i].prompt, found[i], max_new_tokens=tokens)
        return res.token_ids, time.perf_counter() - t0

    alone = {i: answer(i)[0] for i in range(len(items))}
    rows: list[dict[str, Any]] = []
    for n in args.levels:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            # every question n times in all, so each level keeps n threads busy
            jobs = [i for _ in range(n) for i in range(len(items))]
            outs = list(pool.map(answer, jobs))
        wall = time.perf_counter() - t0
        latencies = [s for _, s in outs]
        same = sum(ids == alone[i] for (ids, _), i in zip(outs, jobs, strict=True))
        row = {"concurrency": n, "answers": len(jobs), "identical_to_alone": same,
               "answers_per_second": len(jobs) / wall, "p50_seconds": statistics.median(latencies),
               "p95_seconds": percentile(latencies, 0.95)}
        rows.append(row)
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    meta = {"items": len(items), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "concurrency.json").write_text(json.dumps({"meta": meta, "levels": rows},
                                                         indent=2) + "\n")
    plot(rows)
    wrong = [r for r in rows if r["identical_to_alone"] != r["answers"]]
    return 1 if wrong else 0


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(n, [r["answers_per_second"] for r in rows], marker="o")
    a.set(xlabel="concurrent requests", ylabel="answers / s", title="throughput")
    b.plot(n, [r["p50_seconds"] for r in rows], marker="o", label="p50")
    b.plot(n, [r["p95_seconds"] for r in rows], marker="s", label="p95")
    b.set(xlabel="concurrent requests", ylabel="s / answer", title="latency")
    b.legend()
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(x) for x in n])
    fig.tight_layout()
    fig.savefig(RESULTS / "concurrency.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
