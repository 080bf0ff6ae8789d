"""Load test of ``nest serve`` on loopback, batching on against off in one run: throughput,
latency, tokens per model call, errors, and whether batched answers equal solo answers.
``python -m benchmarks.bench_serve [--levels 1 2 4 8] [--rounds 3]``

Starts two real ``nest serve`` processes over the demo handbook store (built with ``nest
index`` once, cached): without batching, with its default 2 answering, and ``--batching``
with 8.
Each answers every one of :data:`QUESTIONS` alone first (the reference); then for each level
of N concurrent clients, one server after the other (so both see the same machine, minutes
apart at most), N clients send ``max(rounds x N, 12)`` requests in all (each client loops
until the budget is spent, or ``--seconds`` pass), and every response is recorded: status,
latency, and whether a 200 answer equals the solo answer token for token. A batched forward
may round differently in the last bits from a solo one (:mod:`nest_core.batching`), so a
near tie can flip an answer: ``wrong`` counts those, never hidden. Tokens per model call
comes from the server's ``/metrics`` (``nest_generated_tokens_total`` over
``nest_model_forwards``). ``--stream``: the clients stream their answers (server-sent events,
the text put together and checked against the solo answer; seconds to the first text too).
Writes ``results/serve_load.json`` and prints a markdown table.
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


# twelve questions over the twelve files of examples/data, one each
QUESTIONS = (
    "Who founded Halvorsen Orchard Robotics, and when?",
    "Where is the headquarters of Halvorsen Orchard Robotics?",
    "How many apples per hour can the Pomona 3 pick?",
    "What are the core hours?",
    "What is the paid leave allowance?",
    "What is the daily meal allowance in Europe?",
    "What colour are contractor badges?",
    "What is the onboarding buddy programme called?",
    "How many weeks a year may employees work fully remotely?",
    "What is the learning budget per year?",
    "Who runs the independent ethics line?",
    "When are payslips published?",
)


def start_server(store: Path, port: int, args: argparse.Namespace, batching: bool
                 ) -> subprocess.Popen[str]:
    concurrent = args.max_concurrent if batching else args.max_concurrent_off
    proc = subprocess.Popen(
        [sys.executable, "-m", "nest_core.app.cli", "serve", "--store", str(store),
         "--port", str(port), "--max-concurrent", str(concurrent), "--mode", args.mode,
         "--max-queue", str(args.max_queue), *(["--batching"] if batching else []),
         *(["--dtype", args.dtype] if args.dtype else [])],
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


def ask(url: str, question: str, max_tokens: int, stream: bool = False
        ) -> tuple[int, float, str | None, float | None]:
    """One chat request: status (-1: no response at all), seconds, the answer's text, and
    (streamed) seconds to its first text."""
    import httpx

    body = {"model": "nest", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": question}]}
    started = time.perf_counter()
    try:
        if not stream:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 \
                else None
            return r.status_code, time.perf_counter() - started, text, None
        parts: list[str] = []
        first: float | None = None
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines() if r.status_code == 200 else []:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[len("data: "):])["choices"]:
                    piece = choice["delta"].get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter() - started
                    parts.append(piece)
        return (r.status_code, time.perf_counter() - started,
                "".join(parts) if r.status_code == 200 else None, first)
    except httpx.TransportError:
        return -1, time.perf_counter() - started, None, None  # lost: no response at all


def counters(url: str) -> dict[str, float]:
    """The server's answer counters (Prometheus text, parsed by prometheus-client)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels}


def run_level(url: str, clients: int, questions: Sequence[str], reference: dict[str, str],
              args: argparse.Namespace) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    budget = [max(args.rounds * clients, len(questions))]
    before = counters(url)
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
            status, seconds, text, first = ask(url, question, args.max_tokens, args.stream)
            with lock:
                records.append({"status": status, "seconds": seconds, "first": first,
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
    after = counters(url)
    tokens = after["nest_generated_tokens_total"] - before["nest_generated_tokens_total"]
    forwards = after["nest_model_forwards"] - before["nest_model_forwards"]
    calls = after["nest_forward_calls_total"] - before["nest_forward_calls_total"]
    ok = [r["seconds"] for r in records if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"clients": clients, "requests": len(records), "answered": len(ok),
            "statuses": statuses, "lost": statuses.get("-1", 0),
            "wrong": sum(r["wrong"] for r in records),
            "answers_per_second": len(ok) / wall if wall else 0.0,
            "p50_seconds": percentile(ok, 0.5), "p95_seconds": percentile(ok, 0.95),
            "p50_first_text_seconds": percentile(
                [r["first"] for r in records if r["first"] is not None], 0.5),
            "mean_seconds": statistics.fmean(ok) if ok else float("nan"),
            "tokens_per_model_call": tokens / forwards if forwards else 0.0,
            "forwards_per_model_call": calls / forwards if forwards else 0.0,
            "wall_seconds": wall}


class Server:
    """One ``nest serve`` (batching on or off) and its solo answers."""

    def __init__(self, store: Path, args: argparse.Namespace, batching: bool) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{port}"
        self.batching = batching
        self.max_concurrent = args.max_concurrent if batching else args.max_concurrent_off
        self.proc = start_server(store, port, args, batching)
        self.reference: dict[str, str] = {}
        self.levels: list[dict[str, Any]] = []

    def solo_answers(self, args: argparse.Namespace) -> None:
        ask(self.url, QUESTIONS[0], args.max_tokens)  # warm-up: first-call costs out
        for q in QUESTIONS:
            status, _, text, _ = ask(self.url, q, args.max_tokens)
            if status != 200 or text is None:
                raise SystemExit(f"the reference answer failed with status {status}")
            self.reference[q] = text

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def record(self) -> dict[str, Any]:
        return {"batching": self.batching, "max_concurrent": self.max_concurrent,
                "reference": self.reference, "levels": self.levels}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=3,
                    help="requests per client at each level (at least 6 per level)")
    ap.add_argument("--seconds", type=float, default=300.0, help="most seconds per level")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-concurrent", type=int, default=8, help="answering, batching on")
    ap.add_argument("--max-concurrent-off", type=int, default=2,
                    help="answering, batching off (its shipped default)")
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--settings", default="off,on", help="off,on or one of them")
    ap.add_argument("--mode", default="default",
                    help="the servers' --mode (nest: the paper's decoding, longer answers)")
    ap.add_argument("--out", default="serve_load.json", help="file name under results/")
    ap.add_argument("--stream", action="store_true",
                    help="clients stream their answers (checked against the solo answers)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="the model's dtype in both servers (default: nest serve's)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    store = build_store()
    servers: list[Server] = []
    try:
        for name in args.settings.split(","):
            servers.append(Server(store, args, batching=name == "on"))
        for server in servers:
            server.solo_answers(args)
        for n in args.levels:  # each level on every server in turn
            for server in servers:
                server.levels.append(run_level(server.url, n, QUESTIONS, server.reference,
                                               args))
    finally:
        for server in servers:
            server.stop()
    runs = [server.record() for server in servers]
    solo = runs[0]["reference"]
    for run in runs:  # a request alone decodes the same whatever the setting
        run["solo_answers_differ"] = sum(run["reference"][q] != solo[q] for q in QUESTIONS)
    out = {"mode": args.mode, "max_tokens": args.max_tokens, "dtype": args.dtype or "float32",
           "stream": args.stream, "cpu_count": os.cpu_count(),
           "questions": len(QUESTIONS), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"nest serve --mode {args.mode} on loopback, {os.cpu_count()} CPUs, max_tokens "
          f"{args.max_tokens}, {len(QUESTIONS)} questions{', streamed' if args.stream else ''}; "
          f"solo answers that differ between the servers: {runs[-1]['solo_answers_differ']}\n")
    first = " | p50 s to first text" if args.stream else ""
    print("| batching | clients | requests | 429 / 503 | lost | wrong | answers/s | x 1 client "
          f"| p50 s | p95 s | tokens / model call | forwards / model call{first} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * bool(first))
    for run in runs:
        one = run["levels"][0]["answers_per_second"] or float("nan")
        for lv in run["levels"]:
            st = lv["statuses"]
            print(f"| {'on' if run['batching'] else 'off'} ({run['max_concurrent']}) | "
                  f"{lv['clients']} | {lv['requests']} | {st.get('429', 0)} / "
                  f"{st.get('503', 0)} | {lv['lost']} | {lv['wrong']} | "
                  f"{lv['answers_per_second']:.2f} | {lv['answers_per_second'] / one:.2f} | "
                  f"{lv['p50_seconds']:.1f} | {lv['p95_seconds']:.1f} | "
                  f"{lv['tokens_per_model_call']:.2f} | {lv['forwards_per_model_call']:.2f} |"
                  + (f" {lv['p50_first_text_seconds']:.2f} |" if args.stream else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
