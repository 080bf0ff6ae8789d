"""Calibrate Nest's knobs for the bundled SmolLM2-135M on the **dev** split.

``python -m benchmarks.calibrate [--items N]``: coordinate descent from the paper's defaults.
Each knob is swept in turn with the others fixed at their best value so far; a value wins on
mean quality ((ROUGE-1 F1 + answer recall) / 2), and among values within ``TIE`` of the best
quality the fastest wins. "Fastest" is the *modeled* speed ratio to base: every forward's
size is recorded and priced with the quiet-machine cost curve (``systems.FORWARD_COST``),
because quality and forward sizes are deterministic (greedy) while wall-clock timings on a
shared 2-core machine are not. Measured ratios are recorded beside it. Every evaluated
point is written to ``benchmarks/results/calibration.json``. The test split is never touched here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.foldoc import load_passages, require_corpus
from benchmarks.systems import Runner
from benchmarks.tasks import Item, completion_items, qa_items, select

logger = logging.getLogger("benchmarks.calibrate")
OUT = Path(__file__).parent / "results" / "calibration.json"
TIE = 0.01
MAX_PASSAGES = 10  # b=20/40 are not swept: encoding them costs minutes per item here

# Sweep order: retrieval size first (it shapes every later knob), then RRC, then spans.
SWEEP: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("num_passages", (5, 10)),  # SmolLM2's ρ at the first step is 0.16-0.26: α matters
    ("confidence_offset", (0.1, 0.15, 0.2, 0.3, 0.5)),
    ("confidence_scale", (0.05, 0.1, 0.2)),
    ("span_threshold", (0.3, 0.5, 0.7)),
    ("relaxation", (5e-3, 5e-2, 0.2)),
    ("span_length", (16, 64)),
    ("initial_span_length", (4, 16)),
    ("num_neighbors", (256, 1024)),
)
START: dict[str, Any] = {"num_passages": 10, "num_neighbors": 1024, "confidence_offset": 0.3,
                         "confidence_scale": 0.1, "span_threshold": 0.5, "relaxation": 5e-2,
                         "span_length": 64, "initial_span_length": 64}


@dataclass
class Point:
    """One evaluated configuration on the dev items."""

    knob: str
    config: dict[str, Any]
    completion_rouge1: float
    qa_recall: float
    attribution_ratio: float
    forwards_per_token: float
    speed_ratio: float  # median over items of tok/s / base tok/s (base run next to it)
    modeled_speed_ratio: float  # same with forwards priced by the cost curve
    tokens_per_second: float
    seconds: float
    per_item: list[dict[str, Any]] = field(default_factory=list)

    @property
    def quality(self) -> float:
        return (self.completion_rouge1 + self.qa_recall) / 2


def decoder_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The NestConfig fields of a sweep point (``num_passages`` is applied at retrieval)."""
    return {k: v for k, v in config.items() if k != "num_passages"}


def evaluate(lm: Any, store: Any, items: Sequence[Item], found: dict[str, Any],
             config: dict[str, Any], knob: str, base_tps: dict[str, float]) -> Point:
    t0 = time.perf_counter()
    runners = {task: Runner(lm, store, max_new_tokens=tokens,
                            nest_overrides=decoder_overrides(config))
               for task, tokens in (("completion", 64), ("qa", 32))}
    recs = []
    for item in items:
        passages = found[item.key].passages[: config["num_passages"]]
        recs.append(runners[item.task].run("nest", item, passages, found[item.key].seconds))
    comp = [r.quality for r in recs if r.task == "completion"]
    qa = [r.quality for r in recs if r.task == "qa"]
    tokens = sum(r.generated_tokens for r in recs) or 1
    return Point(
        knob=knob, config=dict(config),
        completion_rouge1=statistics.fmean(comp) if comp else 0.0,
        qa_recall=statistics.fmean(qa) if qa else 0.0,
        attribution_ratio=statistics.fmean(r.attribution_ratio for r in recs),
        forwards_per_token=sum(r.lm_forwards for r in recs) / tokens,
        speed_ratio=statistics.median(r.tokens_per_second / base_tps[r.key][0] for r in recs),
        modeled_speed_ratio=statistics.median(r.modeled_tokens_per_second / base_tps[r.key][1]
                                              for r in recs),
        tokens_per_second=statistics.median(r.tokens_per_second for r in recs),
        seconds=time.perf_counter() - t0,
        per_item=[{"key": r.key, "quality": r.quality, "attr": r.attribution_ratio,
                   "tokens": r.generated_tokens, "forwards": r.lm_forwards} for r in recs])


def pick(points: Sequence[Point]) -> Point:
    """Best quality; within ``TIE`` of it, the fastest."""
    best = max(p.quality for p in points)
    return max((p for p in points if p.quality >= best - TIE),
               key=lambda p: p.modeled_speed_ratio)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=3, help="dev items per task")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("benchmarks").setLevel(logging.INFO)  # progress, not library chatter
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_corpus()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.run import open_search
    from nest_core import load_model
    from nest_core.models import cache_dir
    from nest_core.stores.datastore import SpanDatastore

    search = open_search(load_passages())["faiss"]
    lm = load_model()
    store = SpanDatastore(cache_dir() / "bench" / "spans")
    items = select(completion_items(), "dev", args.items) + select(qa_items(), "dev", args.items)
    found = {it.key: search.search(it.query, MAX_PASSAGES) for it in items}
    base = {task: Runner(lm, store, max_new_tokens=n) for task, n in (("completion", 64),
                                                                      ("qa", 32))}
    base_tps = {}
    for it in items:
        base[it.task].warm(found[it.key].passages)
        rec = base[it.task].run("base", it, [], 0.0)
        base_tps[it.key] = (rec.tokens_per_second, rec.modeled_tokens_per_second)
    current, history, chosen = dict(START), [], {}
    seen: dict[str, Point] = {}  # a knob's current value was measured by the previous sweep
    for knob, values in SWEEP:
        points = []
        for value in values:
            config = {**current, knob: value}
            if config["initial_span_length"] > config["span_length"]:
                if knob == "initial_span_length":
                    continue  # invalid in NestConfig
                config["initial_span_length"] = config["span_length"]
            memo = json.dumps(config, sort_keys=True)
            if memo in seen:
                points.append(seen[memo])
                continue
            point = evaluate(lm, store, items, found, config, knob, base_tps)
            seen[memo] = point
            logger.info("%s=%s quality=%.3f (R1 %.3f, recall %.3f) attr=%.2f fwd/tok=%.2f "
                        "speed=%.2fx (modeled %.2fx)", knob, value, point.quality,
                        point.completion_rouge1, point.qa_recall, point.attribution_ratio,
                        point.forwards_per_token, point.speed_ratio, point.modeled_speed_ratio)
            points.append(point)
            history.append(point)
        current = dict(pick(points).config)
        chosen[knob] = current[knob]
        write(history, current, len(items))
    logger.info("recommended: %s", current)


def write(history: Sequence[Point], current: dict[str, Any], n_items: int) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    payload = {"split": "dev", "items": n_items, "start": START, "recommended": current,
               "rule": f"max quality; within {TIE} of it, max modeled speed ratio",
               "points": [{**asdict(p), "quality": p.quality} for p in history]}
    OUT.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
