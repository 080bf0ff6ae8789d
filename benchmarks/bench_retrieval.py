"""Top-k retrieval latency from a FAISS store of 100,000+ passages: flat vs IVF vs HNSW.

Stage 1 must stay small next to decoding as the store grows. Vectors are synthetic (random
clusters on the unit sphere, 384-d like MiniLM) so the scale is real without embedding a
corpus; queries are perturbed stored vectors; recall@1 is agreement with the exact top-1. Latency is
per single query through :meth:`FaissStore.search` (FAISS search + sidecar passages), after
the store has been saved and re-opened from disk. Runs in well under 3 minutes on 2 cores.

    python benchmarks/bench_retrieval.py [--passages 100000] [--k 40] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from nest_core.stores.sources.faiss_store import INDEX_FILE, SIDECAR_FILE, FaissStore
from nest_core.types import Passage

WORDS = ["compiler", "kernel", "packet", "protocol", "memory", "cache", "register", "thread",
         "socket", "parser", "grammar", "token", "lexer", "linker", "loader", "bus", "clock",
         "pipeline", "branch", "vector"]


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, list[Passage]]:
    """``n`` unit vectors around ``n // 100`` cluster centres, and ~60-word passages."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)]
    vectors += 0.5 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim) * 4
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    words = np.asarray(WORDS)[rng.integers(0, len(WORDS), (n, 60))]
    passages = [Passage(id=f"doc{i}#0", text=" ".join(row), title=f"entry {i}",
                        metadata={"doc_id": f"doc{i}", "start": 0, "end": 0})
                for i, row in enumerate(words.tolist())]
    return vectors, passages


def bench(kind: str, path: Path, vectors: np.ndarray, passages: list[Passage],
          queries: np.ndarray, truth: np.ndarray, k: int) -> dict[str, float | str]:
    t0 = time.perf_counter()
    store = FaissStore.create(path, vectors.shape[1], kind=kind)  # type: ignore[arg-type]
    store.add(passages, vectors)
    store.save()
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = FaissStore.open(path)
    load = time.perf_counter() - t0
    store.search(queries[:5], k)  # warm-up
    times, hits = [], 0
    for q, want in zip(queries, truth, strict=True):
        t0 = time.perf_counter()
        got = store.search(q[None, :], k)[0]
        times.append(time.perf_counter() - t0)
        hits += got[0].id == f"doc{want}#0"
    ms = sorted(t * 1e3 for t in times)
    return {"index": kind, "passages": len(store), "build_s": build, "open_s": load,
            "p50_ms": statistics.median(ms), "p95_ms": ms[int(0.95 * (len(ms) - 1))],
            "mean_ms": statistics.fmean(ms), "recall@1": hits / len(queries),
            "index_mb": (path / INDEX_FILE).stat().st_size / 2**20,
            "sidecar_mb": (path / SIDECAR_FILE).stat().st_size / 2**20,
            "params": _params(store)}


def _params(store: FaissStore) -> str:
    if store.meta.kind == "ivf":
        return f"nlist={store.meta.nlist} nprobe={store.meta.nprobe}"
    if store.meta.kind == "hnsw":
        return f"M={store.meta.hnsw_m} efSearch={store.meta.ef_search}"
    return "exact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    vectors, passages = synthetic(args.passages, args.dim)
    rng = np.random.default_rng(1)
    truth = rng.integers(0, args.passages, args.queries)
    queries = vectors[truth] + 0.02 * rng.standard_normal((args.queries, args.dim)) \
        .astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argmax(queries @ vectors.T, axis=1)  # exact top-1: recall is agreement with it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            rows.append(bench(kind, Path(tmp) / kind, vectors, passages, queries, truth,
                              args.k))
            print(f"done {kind}", flush=True)
    header = (f"\nFAISS store, {args.passages:,} passages x {args.dim}-d, top-{args.k}, "
              f"{args.queries} single queries (search + sidecar), after reopen from disk\n")
    print(header)
    print("| index | params | build+save s | open s | p50 ms | p95 ms | mean ms | recall@1 "
          "| index MB | sidecar MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['open_s']:.2f} | "
              f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['mean_ms']:.2f} | "
              f"{r['recall@1']:.3f} | {r['index_mb']:.0f} | {r['sidecar_mb']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
