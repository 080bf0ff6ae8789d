"""From per-item :class:`~benchmarks.systems.RunRecord` s to the summary: aggregation,
markdown table, the marked region of ``docs/benchmarks.md`` and the quality-vs-speed plot.

Speed is summarised robustly because the benchmark machine is shared: tokens/s is the median
over items, and the speed ratio is the median over items of (system tokens/s / base tokens/s
on the same item, measured back to back).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.systems import LABELS, SYSTEMS, RunRecord
from benchmarks.tasks import TASKS

# The region of docs/benchmarks.md a full run rewrites (the README names the command and
# links there; it is never written by a run)
BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"
TASK_TITLES = {"completion": "FOLDOC completion", "qa": "FOLDOC acronym QA",
               "docqa": "iso-codes document QA"}


@dataclass(frozen=True)
class SystemSummary:
    """One row of the table: a system on a task, over all its items."""

    system: str
    task: str
    items: int
    quality: float  # mean ROUGE-1 F1 or mean answer recall
    attribution_ratio: float
    mean_span_length: float  # mean over items that copied anything
    forwards_per_token: float
    tokens_per_second: float  # median over items, end to end
    speed_ratio: float  # median over items of tok/s divided by base tok/s on that item
    modeled_speed_ratio: float  # same, with LM forwards priced by the quiet-machine cost curve
    ms_per_token: dict[str, float]  # latency split, total seconds / total tokens, in ms
    overhead_ms_per_step: float  # (kNN + rest) per LM forward: cost beyond the forward
    seconds_per_answer: float = 0.0  # median over items, end to end (search + prompt + decode)
    first_token_seconds: float = 0.0  # median over items: search + prompt to the first text
    answer_words: float = 0.0  # mean words per output
    answer_words_vs_base: float = 0.0  # mean words / base's mean words on the same items
    # doc-QA: share of items whose gold answer lies in a span from the gold passage (None:
    # the system has no spans); gold_retrieved: share of items with the gold passage in top b
    cited_copied: float | None = None
    cited_matched: float | None = None
    cited_any: float | None = None
    gold_retrieved: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _mean_or_none(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def summarise(records: Sequence[RunRecord]) -> list[SystemSummary]:
    base_tps = {(r.task, r.key): r.tokens_per_second for r in records if r.system == "base"}
    base_model = {(r.task, r.key): r.modeled_tokens_per_second for r in records
                  if r.system == "base"}
    base_words = {(r.task, r.key): r.answer_words for r in records if r.system == "base"}
    out = []
    for task in TASKS:
        for system in SYSTEMS:
            rs = [r for r in records if r.task == task and r.system == system]
            if not rs:
                continue
            tokens = sum(r.generated_tokens for r in rs) or 1
            forwards = sum(r.lm_forwards for r in rs)
            split = {name: 1000 * sum(getattr(r, f"{name}_seconds") for r in rs) / tokens
                     for name in ("search", "datastore", "lm", "knn", "other", "total")}
            ratios = [r.tokens_per_second / base_tps[(task, r.key)] for r in rs
                      if base_tps.get((task, r.key))]
            modeled = [r.modeled_tokens_per_second / base_model[(task, r.key)] for r in rs
                       if base_model.get((task, r.key))]
            spans = [r.mean_span_length for r in rs if r.mean_span_length > 0]
            overhead = (1000 * sum(r.knn_seconds + r.other_seconds for r in rs) / forwards
                        if forwards else 0.0)
            paired = [r for r in rs if (task, r.key) in base_words]
            base_total = sum(base_words[(task, r.key)] for r in paired)
            retrieved = [r.extra["gold_retrieved"] for r in rs if "gold_retrieved" in r.extra]
            out.append(SystemSummary(
                system=system, task=task, items=len(rs),
                quality=statistics.fmean(r.quality for r in rs),
                attribution_ratio=statistics.fmean(r.attribution_ratio for r in rs),
                mean_span_length=statistics.fmean(spans) if spans else 0.0,
                forwards_per_token=forwards / tokens,
                tokens_per_second=_median([r.tokens_per_second for r in rs]),
                speed_ratio=_median(ratios), modeled_speed_ratio=_median(modeled),
                ms_per_token=split,
                overhead_ms_per_step=overhead,
                seconds_per_answer=_median([r.total_seconds for r in rs]),
                first_token_seconds=_median([r.first_token_seconds for r in rs]),
                answer_words=statistics.fmean(r.answer_words for r in rs),
                answer_words_vs_base=(sum(r.answer_words for r in paired) / base_total
                                      if base_total else 0.0),
                cited_copied=_mean_or_none([r.cited_copied for r in rs]),
                cited_matched=_mean_or_none([r.cited_matched for r in rs]),
                cited_any=_mean_or_none([r.cited_any for r in rs]),
                gold_retrieved=(statistics.fmean(float(x) for x in retrieved)
                                if retrieved else None)))
    return out


def markdown_table(rows: Sequence[SystemSummary]) -> str:
    head = ("| Task | System | Quality | Attribution | Mean span | Fwd/token | tok/s | vs base "
            "| vs base, modeled | ms/token: search / datastore / LM / kNN / rest "
            "| Overhead ms/step |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    lines = [head]
    for r in rows:
        metric = "R-1 F1" if r.task == "completion" else "recall"
        s = r.ms_per_token
        lines.append(
            f"| {r.task} | {LABELS[r.system]} | {r.quality:.3f} ({metric}) "
            f"| {100 * r.attribution_ratio:.0f}% | {r.mean_span_length:.1f} "
            f"| {r.forwards_per_token:.2f} | {r.tokens_per_second:.1f} | {r.speed_ratio:.2f}x "
            f"| {r.modeled_speed_ratio:.2f}x "
            f"| {s['search']:.1f} / {s['datastore']:.1f} / {s['lm']:.1f} / {s['knn']:.1f} / "
            f"{s['other']:.1f} | {r.overhead_ms_per_step:.1f} |")
    return "\n".join(lines)


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def docqa_table(rows: Sequence[SystemSummary]) -> str:
    """The document-QA view: exact-answer recall, cited-correct by span kind, answer length
    and seconds per answer. Empty when no doc-QA rows were run."""
    rows = [r for r in rows if r.task == "docqa"]
    if not rows:
        return ""
    head = ("| System | Recall | Cited-correct: copied / matched / either | Attribution "
            "| Words (vs base) | s/answer | s to first text | tok/s | vs base |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        words_ratio = f"{r.answer_words_vs_base:.2f}x" if r.answer_words_vs_base else "n/a"
        lines.append(
            f"| {LABELS[r.system]} | {r.quality:.3f} "
            f"| {_share(r.cited_copied)} / {_share(r.cited_matched)} / {_share(r.cited_any)} "
            f"| {100 * r.attribution_ratio:.0f}% | {r.answer_words:.1f} ({words_ratio}) "
            f"| {r.seconds_per_answer:.2f} | {r.first_token_seconds:.2f} "
            f"| {r.tokens_per_second:.1f} | {r.speed_ratio:.2f}x |")
    retrieved = next((r.gold_retrieved for r in rows if r.gold_retrieved is not None), None)
    if retrieved is not None:
        lines.append(f"\nGold passage among the retrieved passages: {100 * retrieved:.0f}% of "
                     f"{rows[0].items} questions.")
    return "\n".join(lines)


def replace_marked_region(doc: Path, body: str) -> None:
    """Rewrite only the text between the bench markers of ``doc`` (appending them if
    missing); the file is read fresh just before writing because other people edit the rest
    of it."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if BENCH_START not in text or BENCH_END not in text:
        text = text.rstrip("\n") + f"\n\n{BENCH_START}\n{BENCH_END}\n"
    head, rest = text.split(BENCH_START, 1)
    _, tail = rest.split(BENCH_END, 1)
    doc.write_text(f"{head}{BENCH_START}\n{body.strip()}\n{BENCH_END}{tail}", encoding="utf-8")


def plot(rows: Sequence[SystemSummary], path: Path) -> None:
    """Quality against end-to-end tokens/s (doc-QA: seconds per answer, since its answers
    end early), one panel per task, one point per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r.task == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for n, r in enumerate(r for r in rows if r.task == task):
            # a legend, not annotations: baselines cluster and their labels would overlap
            x = r.seconds_per_answer if task == "docqa" else r.tokens_per_second
            ax.scatter(x, r.quality, s=50, marker="osD^v*P"[n % 7], label=LABELS[r.system])
        ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("seconds per answer (median over items, end to end)" if task == "docqa"
                      else "end-to-end tokens/s (median over items)")
        ax.set_ylabel("ROUGE-1 F1" if task == "completion" else "answer recall")
        ax.set_title(TASK_TITLES[task])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@dataclass(frozen=True)
class Target:
    """One target of issue 6, checked against the summary (a figure, not a test)."""

    name: str
    value: str
    met: bool


def check_targets(rows: Sequence[SystemSummary]) -> list[Target]:
    by = {(r.task, r.system): r for r in rows}
    out: list[Target] = []
    for task in ("completion", "qa"):
        nest, base = by.get((task, "nest")), by.get((task, "base"))
        knn, lookup = by.get((task, "knn-lm")), by.get((task, "rag+lookup"))
        if nest is None or base is None:
            continue
        out.append(Target(f"{task}: Nest >= 2.0x base tok/s (measured; modeled)",
                          f"{nest.speed_ratio:.2f}x; {nest.modeled_speed_ratio:.2f}x",
                          nest.speed_ratio >= 2.0))
        if lookup is not None:
            out.append(Target(f"{task}: Nest >= RAG + prompt lookup (speed ratio)",
                              f"{nest.speed_ratio:.2f}x vs {lookup.speed_ratio:.2f}x",
                              nest.speed_ratio >= lookup.speed_ratio))
        out.append(Target(f"{task}: Nest overhead beyond the LM forward <= 1 ms/step",
                          f"{nest.overhead_ms_per_step:.1f} ms", nest.overhead_ms_per_step <= 1))
        beats = nest.quality > base.quality and (knn is None or nest.quality > knn.quality)
        out.append(Target(f"{task}: Nest quality > base and kNN-LM",
                          f"{nest.quality:.3f} vs {base.quality:.3f} / "
                          f"{knn.quality if knn else float('nan'):.3f}", beats))
        out.append(Target(f"{task}: Nest attribution >= 60%",
                          f"{100 * nest.attribution_ratio:.0f}%", nest.attribution_ratio >= 0.6))
    return out


def targets_markdown(targets: Sequence[Target]) -> str:
    lines = ["| Target | Value | Met |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.value} | {'yes' if t.met else '**no**'} |" for t in targets]
    return "\n".join(lines)
