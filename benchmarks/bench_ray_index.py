"""Span-datastore encoding, passages/s: one process vs Ray Data with 1 and 2 workers.

``python -m benchmarks.bench_ray_index [--passages 200] [--small 40] [--workers 1 2]``

Every system encodes the same passages (consecutive FOLDOC passages when ``dict-foldoc`` is
installed, else the handbook in ``examples/data``) into a fresh datastore with the bundled
SmolLM2-135M-Instruct (fp32). Two figures per system:

- end to end: ``passages / seconds`` of the whole call, what ``nest index --ray`` costs,
  starting the local Ray cluster and loading the model in every worker included;
- marginal: ``(passages - small) / (seconds - seconds_small)`` from a second, ``small`` run,
  so the fixed start cost cancels: the rate a long index run approaches.

Each Ray datastore is compared byte for byte with the single-process one (``identical``).
Writes ``results/ray_index.json`` and prints a markdown table. A figure, not a timed test:
on a 2-core CPU two workers (one thread each) share the cores one process uses with two
threads, so the gain there is small; on a cluster each worker brings its own cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
HANDBOOK = Path(__file__).resolve().parent.parent / "examples" / "data"


@dataclass
class Row:
    """One system's figures (see the module docstring)."""

    system: str
    workers: int
    threads: int
    passages: int
    seconds: float
    passages_per_s: float
    small_passages: int
    small_seconds: float
    marginal_passages_per_s: float
    identical: bool | None  # datastore bytes == the single-process one (None: it is that one)


def corpus(n: int, offset: int = 2000) -> tuple[str, list[Any]]:
    """``n`` passages: consecutive FOLDOC ones from ``offset`` when the dictionary is
    installed, else the handbook's chunks (repeated titles varied, so each is new)."""
    from benchmarks.foldoc import DICT_FILE, load_passages

    if DICT_FILE.is_file():
        return "foldoc", list(load_passages()[offset:offset + n])
    from nest_core.stores.ingest import Document, chunk_document
    from nest_core.types import Passage

    base = [p for f in sorted(HANDBOOK.glob("*.md"))
            for p in chunk_document(Document(text=f.read_text(encoding="utf-8"), title=f.stem))]
    out = [Passage(f"{p.id}~{i}", p.text, title=f"{p.title} ({i // len(base)})")
           for i, p in enumerate(base * (n // len(base) + 1))]
    return "handbook", out[:n]


def span_files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*.span"))}


def encode_single(threads: int) -> Callable[..., Any]:
    """One process, ``threads`` torch threads: :func:`nest_core.stores.ingest.precompute`."""

    def run(passages: Sequence[Any], lm: Any, store: Any) -> None:
        import torch

        from nest_core.stores.ingest import precompute

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            precompute(passages, lm, datastore=store, progress=False)
        finally:
            torch.set_num_threads(before)

    return run


def encode_ray(workers: int, load: Callable[[], Any] | None = None) -> Callable[..., Any]:
    """Ray Data, ``workers`` one-CPU workers on a local cluster started (and stopped) by
    the call, as ``nest index --ray --ray-workers N`` does."""

    def run(passages: Sequence[Any], lm: Any, store: Any) -> None:
        from nest_core.stores.ray_index import RayOptions, precompute_on_ray

        precompute_on_ray(passages, lm, datastore=store, progress=False,
                          options=RayOptions(workers=workers), load=load)

    return run


def measure(passages: Sequence[Any], lm: Any, systems: Sequence[tuple[str, int, int, Any]],
            small: int, workdir: Path) -> list[Row]:
    """Time every ``(name, workers, threads, run)`` on ``passages`` and on the first
    ``small`` of them, each into a fresh datastore; the first system is the reference."""
    from nest_core.stores.datastore import SpanDatastore

    rows: list[Row] = []
    reference: dict[str, bytes] | None = None
    for name, workers, threads, run in systems:
        times = {}
        for size in (small, len(passages)):
            path = workdir / f"{name}-{size}"
            store = SpanDatastore(path)
            t0 = time.perf_counter()
            run(passages[:size], lm, store)
            times[size] = time.perf_counter() - t0
            print(f"  {name}: {size} passages in {times[size]:.1f} s", flush=True)
        files = span_files(workdir / f"{name}-{len(passages)}")
        if reference is None:
            reference, same = files, None
        else:
            same = files == reference
        big, little = times[len(passages)], times[small]
        marginal = (len(passages) - small) / (big - little) if big > little else float("nan")
        rows.append(Row(system=name, workers=workers, threads=threads, passages=len(passages),
                        seconds=round(big, 2), passages_per_s=round(len(passages) / big, 3),
                        small_passages=small, small_seconds=round(little, 2),
                        marginal_passages_per_s=round(marginal, 3), identical=same))
    return rows


def markdown(rows: Sequence[Row]) -> str:
    lines = [("| system | workers x threads | passages | seconds | passages/s (end to end) "
             "| passages/s (marginal) | identical datastore |"),
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "reference" if r.identical is None else ("yes" if r.identical else "NO")
        lines.append(f"| {r.system} | {r.workers} x {r.threads} | {r.passages} | "
                     f"{r.seconds:.1f} | {r.passages_per_s:.2f} | "
                     f"{r.marginal_passages_per_s:.2f} | {same} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=200)
    ap.add_argument("--small", type=int, default=40,
                    help="passages of the second run that cancels the start cost")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "ray_index.json")
    args = ap.parse_args(argv)
    if not 0 < args.small < args.passages:
        ap.error(f"--small {args.small} must be between 1 and --passages {args.passages}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from nest_core.app.common import quiet_transformers
    from nest_core.encoding import PassageEncoder
    from nest_core.models import load_model

    quiet_transformers()
    lm = load_model()
    source, passages = corpus(args.passages)
    tokens = sum(len(PassageEncoder(lm)._tokenise(p)[0]) for p in passages)
    cores = os.cpu_count() or 1
    systems: list[tuple[str, int, int, Any]] = [
        ("single process", 1, torch.get_num_threads(), encode_single(torch.get_num_threads()))]
    if torch.get_num_threads() != 1:
        systems.append(("single process, 1 thread", 1, 1, encode_single(1)))
    systems += [(f"ray, {n} worker{'s' if n > 1 else ''}", n, 1, encode_ray(n))
                for n in args.workers]
    print(f"{len(passages)} {source} passages ({tokens} tokens), SmolLM2 fp32, {cores} cores")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(passages, lm, systems, args.small, Path(tmp))
    meta = {"corpus": source, "passages": len(passages), "tokens": tokens, "model": lm.name,
            "dtype": str(lm.dtype), "cpu_count": cores, "platform": platform.platform(),
            "torch": torch.__version__, "ray": ray.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m benchmarks.bench_ray_index " + " ".join(
                [f"--passages {args.passages}", f"--small {args.small}",
                 "--workers " + " ".join(map(str, args.workers))])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]},
                                   indent=2) + "\n", encoding="utf-8")
    print()
    print(markdown(rows))
    print(f"\nwrote {args.out}")
    return 0 if all(r.identical is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
