"""Where the default system's time goes on doc-QA: overhead per step and time to first text.

Runs ``default_config()`` and the base model on doc-QA dev items, interleaved per item (the
order alternates), with the benchmark's passage search (the store's 200 nearest re-ranked by
the question's words) and a warm span datastore, and times the parts with wrappers:

* overhead per step: (kNN + other seconds) per LM forward, summed over the answers (the
  benchmark table's column), and the parts of it per answer (medians); split into the
  set-up each answer pays once (focus, chat template, token index, generation, matching)
  and the rest, per step of the decoding loop;
* time to first text, split into passage search (query embedding + store, lexical re-rank),
  the decoder's set-up (focus, chat template, token index) and the prompt's prefill, for
  the default and for the base model, which reads no passages.

Timings on a shared 2-core machine are noisy: compare runs made at the same time. Run:
``python -m benchmarks.bench_latency [--items 30] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

SPLIT = {  # (module, attribute path) -> label; the module's own name is looked up once
    ("nest_core.decoder", "best_sentences"): "focus ranking",
    ("nest_core.decoder", "continues_passage"): "continuation test",
    ("nest_core.lm", "LanguageModel.prompt_ids"): "chat template + tokenize",
    ("nest_core.decoder", "NestDecoder._index"): "token index (keys from datastore)",
    ("nest_core.generation", "Generation.read_prompt"): "prompt prefill (LM)",
    ("nest_core.generation", "Generation.__init__"): "generation set-up",
    ("nest_core.generation", "Generation.lm_beliefs"): "beliefs (kNN side)",
    ("nest_core.generation", "Generation.verify"): "verify",
    ("nest_core.mixture", "scaled_row_max"): "  max/argmax of scaled logits",
    ("nest_core.token_index", "TokenIndex.distances"): "  kNN distances",
    ("nest_core.generation", "Generation.fast_confidence"): "  lambda from 2 distances",
    ("nest_core.token_index", "TokenIndex.nearest"): "  sorted top-k",
    ("nest_core.decoder", "match_spans"): "matching (after the answer)",
    ("nest_core.sources.rerank", "rank_passages"): "search: lexical re-rank",
}


SETUP = ("focus ranking", "continuation test", "chat template + tokenize",
         "token index (keys from datastore)", "generation set-up", "matching (after the answer)")


@contextlib.contextmanager
def timed(acc: dict[str, float]) -> Iterator[None]:
    """Wrap every function of :data:`SPLIT` so that its wall time adds to ``acc``."""
    import importlib

    undo = []
    for (module, path), label in SPLIT.items():
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        inner = getattr(owner, name)

        def wrapper(*a: Any, _f: Any = inner, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t0

        setattr(owner, name, functools.wraps(inner)(wrapper))
        undo.append((owner, name, inner))
    try:
        yield
    finally:
        for owner, name, inner in reversed(undo):
            setattr(owner, name, inner)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from benchmarks.run import CORPUS_OF, FULL, build_items, corpus_passages, open_search
    from nest_core import NestConfig, NestDecoder, load_model
    from nest_core.config import default_config
    from nest_core.datastore import SpanDatastore
    from nest_core.models import cache_dir

    torch.set_num_threads(args.threads)
    plan = FULL.__class__(**{**vars(FULL), "tasks": ("docqa",), "split": "dev",
                             "docqa_items": args.items})
    items = build_items(plan)
    search = open_search(corpus_passages(CORPUS_OF["docqa"]), CORPUS_OF["docqa"])["faiss"]
    lm = load_model()
    store = SpanDatastore(cache_dir() / "bench" / "spans")
    decoders = {"default": NestDecoder(lm, default_config(lm.name), key_cache=store),
                "base": NestDecoder(lm, NestConfig(mode="base"), key_cache=store)}
    for dec in decoders.values():
        dec.generate("Hello", max_new_tokens=2)  # one-off set-up, untimed
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in decoders}
    acc: dict[str, float] = collections.defaultdict(float)
    with timed(acc):
        for n, item in enumerate(items):
            acc.clear()
            found = search.search(item.query, plan.num_passages)
            searched = {"search (total)": found.seconds, **acc}
            decoders["default"].prepare(found.passages)  # warm span datastore
            for name in (list(decoders) if n % 2 == 0 else list(decoders)[::-1]):
                acc.clear()
                rec = _answer(decoders[name], item.prompt,
                              found.passages if name == "default" else None,
                              plan.tokens("docqa"), acc)
                if name == "default":
                    rec.update(searched)
                    rec["first text"] += found.seconds
                rows[name].append(rec)
    for name, rs in rows.items():
        _report(name, rs)


def _answer(dec: Any, prompt: str, passages: Any, tokens: int, acc: dict[str, float]
            ) -> dict[str, float]:
    t0 = time.perf_counter()
    rec: dict[str, float] = {}
    for chunk in dec.stream(prompt, passages, max_new_tokens=tokens):
        if chunk.text and "first text" not in rec:
            rec["first text"] = time.perf_counter() - t0
            rec.update({f"to first text: {k}": v for k, v in acc.items()})
        if chunk.result is not None:
            st = chunk.result.stats
            rec["first text"] = rec.get("first text", st.total_seconds)
            rec.update(forwards=st.lm_forwards, knn=st.knn_seconds, other=st.other_seconds,
                       datastore=st.datastore_seconds,
                       prompt_read=st.prompt_tokens - st.prefix_reused_tokens,
                       prompt_reused=st.prefix_reused_tokens)
    rec.update(acc)
    return rec


def _report(name: str, rs: list[dict[str, float]]) -> None:
    forwards = sum(r["forwards"] for r in rs)
    knn = 1000 * sum(r["knn"] for r in rs) / forwards
    other = 1000 * sum(r["other"] for r in rs) / forwards
    med = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in set().union(*rs)}
    print(f"{name}: {len(rs)} answers, {forwards / len(rs):.1f} forwards each, overhead "
          f"{knn + other:.2f} ms/step (kNN {knn:.2f} + other {other:.2f}); first text "
          f"{1000 * med['first text']:.0f} ms; prompt tokens read {med['prompt_read']:.0f}, "
          f"reused {med['prompt_reused']:.0f} (medians)")
    # the per-answer part of the overhead, apart from what each decoding step costs
    # (the token index's time holds the datastore's, which the overhead leaves out)
    setup = sum(sum(r.get(label, 0.0) for label in SETUP) - r.get("datastore", 0.0)
                for r in rs)
    loop = 1000 * (sum(r["knn"] + r["other"] for r in rs) - setup) / forwards
    print(f"  set-up per answer (focus, chat template, token index, generation, matching): "
          f"{1000 * setup / len(rs):.2f} ms; the rest per step (the decoding loop): "
          f"{loop:.2f} ms")
    for key in sorted(k for k in med if k.startswith(("to first text", "search"))):
        print(f"  {key:60s} {1000 * med[key]:8.2f} ms")
    for label in SPLIT.values():
        if med.get(label):
            print(f"  {label:60s} {1000 * med[label]:8.2f} ms/answer")


if __name__ == "__main__":
    main()
