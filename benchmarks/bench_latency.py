"""Where the default system's time goes on doc-QA: overhead per step and time to first text.

Runs ``default_config()`` and the base model on doc-QA dev items, interleaved per item (the
order alternates), with the benchmark's passage search (the store's 200 nearest re-ranked by
the question's words) and a warm span datastore, and times the parts with cProfile:

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
import cProfile
import os
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPLIT = {  # (file in the repository, function name) -> label
    ("nest_core/focus.py", "best_sentences"): "focus ranking",
    ("nest_core/focus.py", "continues_passage"): "continuation test",
    ("nest_core/lm.py", "prompt_ids"): "chat template + tokenize",
    ("nest_core/decoder.py", "_index"): "token index (keys from datastore)",
    ("nest_core/decoding/loop.py", "read_prompt"): "prompt prefill (LM)",
    ("nest_core/decoding/loop.py", "__init__"): "generation set-up",
    ("nest_core/decoding/judges.py", "judged"): "beliefs (kNN side)",
    ("nest_core/decoding/judges.py", "verify"): "verify",
    ("nest_core/decoding/mixture.py", "scaled_row_max"): "  max/argmax of scaled logits",
    ("nest_core/token_index.py", "distances"): "  kNN distances",
    ("nest_core/decoding/judges.py", "quick"): "  lambda from 2 distances",
    ("nest_core/token_index.py", "nearest"): "  sorted top-k",
    ("nest_core/matching.py", "match_spans"): "matching (after the answer)",
    ("nest_core/focus.py", "rank_passages"): "search: lexical re-rank",
}


SETUP = ("focus ranking", "continuation test", "chat template + tokenize",
         "token index (keys from datastore)", "generation set-up", "matching (after the answer)")


class Profiled:
    """Seconds spent inside the functions of :data:`SPLIT` (cumulative, callees included),
    observed with cProfile: nothing in the code is wrapped or replaced. The profiler adds
    a small cost per Python call, to the parts and to the totals alike."""

    def __init__(self) -> None:
        self.prof = cProfile.Profile()

    def __enter__(self) -> Profiled:
        self.prof.enable()
        return self

    def __exit__(self, *exc: object) -> None:
        self.prof.disable()

    def seconds(self, resume: bool = True) -> dict[str, float]:
        """The time per label so far; reading stops the profiler, ``resume`` restarts it."""
        stats: dict[Any, Any] = pstats.Stats(self.prof).stats  # type: ignore[attr-defined]
        if resume:
            self.prof.enable()
        out: dict[str, float] = {}
        for (filename, _, name), (_, _, _, cumulative, _) in stats.items():
            path = Path(filename)
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else ""
            label = SPLIT.get((rel, name))
            if label is not None:
                out[label] = out.get(label, 0.0) + cumulative
        return out


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
    from nest_core.models import cache_dir
    from nest_core.stores.datastore import SpanDatastore

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
    for n, item in enumerate(items):
        with Profiled() as prof:
            found = search.search(item.query, plan.num_passages)
        searched = {"search (total)": found.seconds, **prof.seconds(resume=False)}
        decoders["default"].prepare(found.passages)  # warm span datastore
        for name in (list(decoders) if n % 2 == 0 else list(decoders)[::-1]):
            rec = _answer(decoders[name], item.prompt,
                          found.passages if name == "default" else None,
                          plan.tokens("docqa"))
            if name == "default":
                rec.update(searched)
                rec["first text"] += found.seconds
            rows[name].append(rec)
    for name, rs in rows.items():
        _report(name, rs)


def _answer(dec: Any, prompt: str, passages: Any, tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    rec: dict[str, float] = {}
    with Profiled() as prof:
        for chunk in dec.stream(prompt, passages, max_new_tokens=tokens):
            if chunk.text and "first text" not in rec:
                rec["first text"] = time.perf_counter() - t0
                rec.update({f"to first text: {k}": v for k, v in prof.seconds().items()})
            if chunk.result is not None:
                st = chunk.result.stats
                rec["first text"] = rec.get("first text", st.total_seconds)
                rec.update(forwards=st.lm_forwards, knn=st.knn_seconds,
                           other=st.other_seconds, datastore=st.datastore_seconds,
                           prompt_read=st.prompt_tokens - st.prefix_reused_tokens,
                           prompt_reused=st.prefix_reused_tokens)
    rec.update(prof.seconds(resume=False))
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
