"""Issue-2 figures: 128 new tokens, 10 passages, SmolLM2 float32, Nest vs base in one run.

Passages come from the sample handbook (examples/data) through the in-memory MiniLM source,
the span datastore is warmed first (as `nest index` leaves it), and the two systems are
interleaved per question. Overhead per step: (kNN + other seconds) per LM forward, summed over
the answers; "reused" counts prompt tokens taken from the prefix KV cache. Run:
``python -m benchmarks.bench_decoder``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from nest_core import InMemorySource, MemoryKeyCache, NestConfig, NestDecoder, load_model
from nest_core.config import default_config
from nest_core.stores.embeddings import default_embedding_function
from nest_core.stores.ingest import Document, chunk_document

DATA = Path(__file__).parent.parent / "examples" / "data"
QUESTIONS = [
    "Tell me about the history of Halvorsen Orchard Robotics.",
    "Describe the offices of Halvorsen Orchard Robotics.",
    "What are the rules for paid leave and time off?",
]


def handbook_source() -> InMemorySource:
    docs = []
    for path in sorted(DATA.glob("*.md")):
        head, _, body = path.read_text(encoding="utf-8").partition("\n")
        docs.append(Document(text=body.strip(), title=head.lstrip("# ").strip(), id=path.stem))
    passages = [p for d in docs for p in chunk_document(d)]
    return InMemorySource(passages, embed=default_embedding_function())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--passages", type=int, default=10)
    args = ap.parse_args()
    lm = load_model()
    source = handbook_source()
    cache = MemoryKeyCache()
    systems = {"base": NestConfig(mode="base"), "nest": default_config(lm.name)}
    rows: dict[str, list] = {name: [] for name in systems}
    for question in QUESTIONS:
        passages = source.retrieve(question, args.passages)
        NestDecoder(lm, systems["nest"], key_cache=cache).prepare(passages)  # warm datastore
        for name, cfg in systems.items():
            res = NestDecoder(lm, cfg, key_cache=cache).generate(
                question, passages, max_new_tokens=args.tokens)
            rows[name].append(res)
    print(f"{args.tokens} new tokens, {args.passages} passages, {len(QUESTIONS)} questions, "
          "medians; seconds per answer: datastore / LM forwards / kNN+mixture / other")
    base_tps = statistics.median(r.stats.tokens_per_second for r in rows["base"])
    for name, results in rows.items():
        med = {k: statistics.median(getattr(r.stats, k) for r in results) for k in (
            "tokens_per_second", "datastore_seconds", "lm_seconds", "knn_seconds",
            "other_seconds")}
        fwd = statistics.median(r.stats.lm_forwards / max(1, len(r.token_ids)) for r in results)
        attr = statistics.median(r.attribution_ratio for r in results)
        span = statistics.median(r.mean_span_length for r in results)
        steps = statistics.median(r.stats.lm_forwards for r in results)
        forwards = sum(r.stats.lm_forwards for r in results)
        knn_ms = 1000 * sum(r.stats.knn_seconds for r in results) / forwards
        other_ms = 1000 * sum(r.stats.other_seconds for r in results) / forwards
        reused = sum(r.stats.prefix_reused_tokens for r in results)
        prompt = sum(r.stats.prompt_tokens for r in results)
        first = statistics.median(r.stats.first_token_seconds for r in results)
        tps = med["tokens_per_second"]
        print(f"{name:5s} {tps:5.1f} tok/s ({tps / base_tps:.2f}x)"
              f" | {fwd:.2f} forwards/token ({steps:.0f}) | attribution {attr:.0%}, mean span "
              f"{span:.1f} | {med['datastore_seconds']:.3f} / {med['lm_seconds']:.2f} / "
              f"{med['knn_seconds']:.3f} / {med['other_seconds']:.3f} s | overhead "
              f"{knn_ms + other_ms:.2f} ms/step (kNN {knn_ms:.2f} + other {other_ms:.2f}) | "
              f"prompt tokens reused {reused}/{prompt} | first text {first:.2f} s")


if __name__ == "__main__":
    main()
