"""Load test of ``nest serve`` on loopback: throughput, latency, errors, and what happens past
capacity. ``python -m benchmarks.bench_serve [--levels 1 4 16] [--requests 16]``

Starts a real ``nest serve`` process over the demo handbook store (built with ``nest index``
once, cached), answers each demo question alone first (the reference), then for each level of
N concurrent clients sends ``--requests`` requests in all (each client loops until the budget
is spent, or ``--seconds`` pass) and records every response: status, latency, and whether a
200 answer equals the reference answer token for token (greedy decoding: it must). Bounded
by request count and duration, it stops by itself. Writes ``results/serve_load.json`` and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def build_store() -> Path:
    from nest_core.models import cache_dir

    out = cache_dir() / "bench" / "serve-handbook"
    if not (out / "nest_faiss.json").is_file():
        subprocess.run([sys.executable, "-m", "nest_core.app.cli", "index",
                        str(ROOT / "examples" / "data"), "--out", str(out), "-q"], check=True)
    return out


def start_server(store: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nest_core.app.cli", "serve", "--store", str(store),
         "--port", str(port), "--max-concurrent", str(args.max_concurrent),
         "--max-queue", str(args.max_queue)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, text=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("nest serve exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("nest serve did not come up within 300 s")


def ask(url: str, question: str, max_tokens: int) -> tuple[int, float, str | None]:
    import httpx

    body = {"model": "nest", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}]}
    started = time.perf_counter()
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    except httpx.TransportError:
        return -1, time.perf_counter() - started, None  # lost: no response at all
    seconds = time.perf_counter() - started
    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
    return r.status_code, seconds, text


def run_level(url: str, clients: int, questions: Sequence[str], reference: dict[str, str],
              args: argparse.Namespace) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    budget = [args.requests]
    deadline = time.monotonic() + args.seconds

    def client(i: int) -> None:
        n = i
        while time.monotonic() < deadline:
            with lock:
                if budget[0] == 0:
                    return
                budget[0] -= 1
            question = questions[n % len(questions)]
            n += clients
            status, seconds, text = ask(url, question, args.max_tokens)
            with lock:
                records.append({"status": status, "seconds": seconds,
                                "wrong": status == 200 and text != reference[question]})
            if status in (429, 503):
                time.sleep(1.0)  # Retry-After: 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r["seconds"] for r in records if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"clients": clients, "requests": len(records), "answered": len(ok),
            "statuses": statuses, "lost": statuses.get("-1", 0),
            "wrong": sum(r["wrong"] for r in records),
            "answers_per_second": len(ok) / wall if wall else 0.0,
            "p50_seconds": percentile(ok, 0.5), "p95_seconds": percentile(ok, 0.95),
            "mean_seconds": statistics.fmean(ok) if ok else float("nan"),
            "wall_seconds": wall}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per level, in all")
    ap.add_argument("--seconds", type=float, default=240.0, help="most seconds per level")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=8)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nest_core.app.demo import QUESTIONS

    store = build_store()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    proc = start_server(store, port, args)
    try:
        reference = {}
        for q in QUESTIONS:
            status, _, text = ask(url, q, args.max_tokens)
            if status != 200 or text is None:
                raise SystemExit(f"the reference answer failed with status {status}")
            reference[q] = text
        levels = [run_level(url, n, QUESTIONS, reference, args) for n in args.levels]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {"max_concurrent": args.max_concurrent, "max_queue": args.max_queue,
           "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(), "levels": levels}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"nest serve, {args.max_concurrent} answering + {args.max_queue} queued, "
          f"{os.cpu_count()} CPUs, max_tokens {args.max_tokens}\n")
    print("| clients | requests | answered | 429 / 503 | lost | wrong | answers/s "
          "| p50 s | p95 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in levels:
        st = lv["statuses"]
        print(f"| {lv['clients']} | {lv['requests']} | {lv['answered']} | "
              f"{st.get('429', 0)} / {st.get('503', 0)} | {lv['lost']} | {lv['wrong']} | "
              f"{lv['answers_per_second']:.2f} | {lv['p50_seconds']:.1f} | "
              f"{lv['p95_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
