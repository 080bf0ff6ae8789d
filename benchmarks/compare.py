"""Decoder settings side by side on a dev split: how the defaults of ``default_config`` are
chosen (quality first: answer recall / ROUGE-1, cited-correct; then seconds per answer).

    python -m benchmarks.compare --task docqa --items 20 \\
        rag='{"mode": "base", "passages_in_prompt": true}' \\
        ra-nest='{"passages_in_prompt": true}'

Each ``name=JSON`` is a set of :class:`~nest_core.NestConfig` fields applied on top of
``paper_config()`` (the paper's algorithm with the model's calibrated numbers); ``default``
alone means ``default_config()``, what every surface ships, and ``"defaults": true`` applies
the fields on top of it; ``"dtype": "bfloat16"`` gives a setting its own model
(``bf16='{"defaults": true, "dtype": "bfloat16"}'``). Every
setting answers the same items with the same top-b passages, items in turn, settings
rotating, so load on the machine spreads evenly. Dev split only: the test split is for the
README table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.run import CORPUS_OF, NUM_PASSAGES, build_items, corpus_passages, open_search
from benchmarks.run import FULL as PLAN
from benchmarks.systems import citations, score
from benchmarks.tasks import answer_words, is_gold_passage

logger = logging.getLogger("benchmarks.compare")


def parse_settings(specs: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """``name=JSON`` pairs -> {name: overrides}; ``default`` -> None (default_config())."""
    out: dict[str, dict[str, Any] | None] = {}
    for spec in specs:
        if spec == "default":
            out["default"] = None
            continue
        name, sep, body = spec.partition("=")
        if not sep:
            msg = f"setting {spec!r}: write name='{{\"field\": value}}' or default"
            raise SystemExit(msg)
        out[name] = json.loads(body)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="name=JSON NestConfig overrides, or default")
    ap.add_argument("--task", choices=tuple(CORPUS_OF), default="docqa")
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--passages", type=int, default=NUM_PASSAGES)
    ap.add_argument("--tokens", type=int, default=0, help="max_new_tokens (0: the task's)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--show", action="store_true", help="print every answer")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="the model of every setting without its own \"dtype\"")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    import torch

    from nest_core.models import cache_dir
    from nest_core.stores.datastore import SpanDatastore

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = parse_settings(args.settings)
    plan = PLAN.__class__(**{**vars(PLAN), "tasks": (args.task,), "split": "dev",
                             f"{args.task}_items": args.items})
    items = build_items(plan)
    stores = open_search(corpus_passages(CORPUS_OF[args.task]), CORPUS_OF[args.task])
    store = SpanDatastore(cache_dir() / "bench" / "spans")
    decoders = {name: decoder(ov or {}, args.dtype, ov is None, store)
                for name, ov in settings.items()}
    tokens = args.tokens or plan.tokens(args.task)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    names = list(settings)
    models = {id(d.lm): d for d in decoders.values()}.values()  # one decoder per model
    for d in models:
        d.generate("Hello", max_new_tokens=2)  # one-off set-up, untimed
    for n, item in enumerate(items):
        found = stores["faiss"].search(item.query, args.passages)
        for d in models:
            d.prepare(found.passages)  # warm span datastore, as run.py
        for k in range(len(names)):
            name = names[(n + k) % len(names)]
            res = decoders[name].generate(item.prompt, found.passages, max_new_tokens=tokens)
            rows[name].append({"quality": score(item, res.text), **citations(item, res),
                               "seconds": res.stats.total_seconds + found.seconds,
                               "words": answer_words(res.text),
                               "attribution": res.attribution_ratio, "text": res.text,
                               "cites": [(res.text[s.out_start:s.out_end], s.passage.id,
                                          s.kind) for s in (*res.spans, *res.matches)]})
        if args.show:
            gold = [i for i, p in enumerate(found.passages)
                    if is_gold_passage(p, item.gold_passage)]
            print(f"{item.prompt} -> {item.references} (gold {item.gold_passage}, rank {gold})")
            for name in names:
                print(f"  {name}: {rows[name][-1]['text']!r} cites {rows[name][-1]['cites']}")
        logger.info("%d/%d %s %s", n + 1, len(items), item.key, "  ".join(
            f"{name}={rows[name][-1]['quality']:.0f}" for name in names))
    print(table(rows))


def decoder(overrides: dict[str, Any], dtype: str | None, default: bool, store: Any) -> Any:
    """The decoder of one setting: ``default`` (or ``"defaults": true`` in its JSON) starts
    from ``default_config()``, else from ``paper_config()``; ``"dtype"`` loads its own model
    (``"bfloat16"``), else ``--dtype``'s; ``"batching": true`` decodes as a batching
    server's lone answer does (in bfloat16 that is the packed path: don't mix it with a
    bfloat16 setting without batching, they share the model)."""
    from nest_core import NestDecoder, load_model
    from nest_core.config import default_config, paper_config

    settings = dict(overrides)
    lm = load_model(dtype=settings.pop("dtype", dtype))
    batching = bool(settings.pop("batching", False))
    start = default_config if settings.pop("defaults", default) else paper_config
    return NestDecoder(lm, start(lm.name, **settings), key_cache=store, batching=batching)


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    head = ("| setting | quality | cited (copied / matched / any) | attribution | words | "
            "s/answer (median) |\n|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, rs in rows.items():
        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return statistics.fmean(vals) if vals else float("nan")
        lines.append(f"| {name} | {mean('quality'):.2f} | {mean('cited_copied'):.2f} / "
                     f"{mean('cited_matched'):.2f} / {mean('cited_any'):.2f} | "
                     f"{mean('attribution'):.0%} | {mean('words'):.1f} | "
                     f"{statistics.median(r['seconds'] for r in rs):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
