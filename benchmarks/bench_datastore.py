"""Per-query span-datastore time for 40 passages: cold (LM encodes) vs warm (disk, memory),
disk bytes per passage, and end-to-end nest vs base tokens/s with a warm datastore, one run.

Passages are consecutive FOLDOC passages (``benchmarks/foldoc.py``); the model is the
bundled SmolLM2-135M-Instruct (fp32). The datastore lives in a temporary directory.

    python benchmarks/bench_datastore.py [--passages 40] [--prompts 3] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from nest_core.config import NestConfig
from nest_core.decoder import NestDecoder
from nest_core.encoding import PassageEncoder
from nest_core.models import load_model
from nest_core.stores.datastore import SpanDatastore


def main() -> None:
    from benchmarks.foldoc import load_passages

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    lm = load_model()
    corpus = load_passages()
    cfg = NestConfig()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        batches = [list(corpus[i * 997: i * 997 + args.passages]) for i in range(args.prompts)]
        cold, disk, memory = [], [], []
        for passages in batches:
            store = SpanDatastore(path)
            enc = PassageEncoder(lm, key_layer=cfg.key_layer, cache=store,
                                 max_passage_tokens=cfg.max_passage_tokens)
            cold.append(_timed(lambda e=enc, p=passages: e.encode(p)))
            memory.append(_timed(lambda e=enc, p=passages: e.encode(p)))
            fresh = PassageEncoder(lm, key_layer=cfg.key_layer, cache=SpanDatastore(path),
                                   max_passage_tokens=cfg.max_passage_tokens)
            disk.append(_timed(lambda e=fresh, p=passages: e.encode(p)))
        store = SpanDatastore(path)
        n_files = len(store)
        rows = sum(e.num_rows for b in batches for e in PassageEncoder(lm, cache=store).encode(b))
        print(f"\nspan datastore, {args.passages} passages per query, SmolLM2 fp32, "
              f"{args.prompts} queries")
        print("| path | mean s per query | per passage ms |")
        print("|---|---|---|")
        for name, ts in (("cold (LM encode + write)", cold), ("warm, disk (new process)", disk),
                         ("warm, memory LRU", memory)):
            mean = sum(ts) / len(ts)
            print(f"| {name} | {mean:.3f} | {mean / args.passages * 1e3:.2f} |")
        print(f"\ndisk: {store.disk_usage():,} bytes for {n_files} passages = "
              f"{store.disk_usage() / n_files:,.0f} bytes/passage "
              f"({rows / n_files:.0f} tokens/passage)")

        base = NestDecoder(lm, NestConfig(mode="base"))
        nest = NestDecoder(lm, cfg, key_cache=SpanDatastore(path))
        totals = {"base": [0, 0.0], "nest": [0, 0.0]}
        for i, passages in enumerate(batches):
            title = passages[0].title or passages[0].text[:40]
            prompt = f"What is {title}?"
            for name, dec in (("base", base), ("nest", nest)):
                t0 = time.perf_counter()
                res = dec.generate(prompt, passages, max_new_tokens=args.max_new_tokens)
                totals[name][0] += len(res.token_ids)
                totals[name][1] += time.perf_counter() - t0
                print(f"  q{i} {name}: {len(res.token_ids)} tokens, "
                      f"{res.stats.total_seconds:.2f} s, datastore "
                      f"{res.stats.datastore_seconds:.3f} s, attribution "
                      f"{res.attribution_ratio:.2f}")
        tps = {k: n / s for k, (n, s) in totals.items()}
        print(f"\nend to end, warm datastore: base {tps['base']:.1f} tok/s, nest "
              f"{tps['nest']:.1f} tok/s, ratio {tps['nest'] / tps['base']:.2f}x")


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
