"""``nest serve --ray --replicas 2`` as a user runs it: a real process that starts a local Ray
cluster on loopback, two Ray Serve replicas (each loading the real SmolLM2 once) over a real
store from ``nest index``, behind Ray's HTTP proxy. Called with the OpenAI wire format over
httpx: the answer and its citations are those of the plain server's app over the same
store (built in-process here, as a replica builds it), streamed too; both replicas answer
(each response names its replica); bad requests get the plain server's errors, and past
capacity the replicas refuse with 429. SIGTERM takes the whole cluster down."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("ray.serve", reason="nest serve --ray needs Ray Serve: "
                    "pip install 'nest-decoding[ray]'")
psutil = pytest.importorskip("psutil")

from conftest import free_port, wait_until_serving  # noqa: E402

from nest_core.app.ray_serve import REPLICA_HEADER  # noqa: E402
from tests.integration.serving import burst, index_handbook  # noqa: E402
from tests.integration.test_cli import NEST, QUESTION  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ANSWER = "1987"
STARTUP_SECONDS = 300
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return index_handbook(tmp_path_factory)


class Served:
    def __init__(self, base: str, proc: subprocess.Popen[str], log: Path) -> None:
        self.base, self.proc, self.log = base, proc, log
        self.descendants: list[Any] = []


@pytest.fixture(scope="module")
def ray_server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``nest serve --ray --replicas 2`` on a loopback port, each replica with room for
    1 answer + 1 queued request; stopped with SIGTERM (checked by the last test)."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray_serve") / "stderr.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    with log.open("w") as err:
        proc = subprocess.Popen([*NEST, "serve", "--ray", "--replicas", "2",
                                 "--store", str(store), "--port", str(port),
                                 "--max-concurrent", "1", "--max-queue", "1",
                                 "--max-tokens-limit", "64"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    served = Served(f"http://127.0.0.1:{port}", proc, log)

    def ready() -> bool:  # the CLI says so once every replica runs
        return "replica(s) running" in log.read_text(encoding="utf-8", errors="replace")

    def failure() -> str:
        state = "did not come up" if proc.poll() is None else f"exited {proc.returncode}"
        return f"nest serve --ray {state}: {log.read_text(errors='replace')[-4000:]}"

    try:
        wait_until_serving(proc, ready, STARTUP_SECONDS, failure)
        served.descendants = psutil.Process(proc.pid).children(recursive=True)
        yield served
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def plain(store: Path) -> Iterator[Any]:
    """The plain server's app over the same store, in-process (FastAPI's TestClient), with
    one torch thread as each replica has (Ray sets OMP_NUM_THREADS to its one CPU)."""
    import torch
    from fastapi.testclient import TestClient

    from nest_core.app.common import DEFAULT_K, DEFAULT_PRESET
    from nest_core.app.guard import allowed_hosts
    from nest_core.app.ray_serve import ReplicaSpec, replica_app
    from nest_core.app.serve import ServeLimits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = ReplicaSpec(store=str(store), k=DEFAULT_K, mode=DEFAULT_PRESET,
                       limits=ServeLimits(max_concurrent=1, max_queue=1, max_tokens=64),
                       hosts=allowed_hosts("127.0.0.1"))
    try:
        with TestClient(replica_app(spec, replica="in-process"),
                        base_url="http://127.0.0.1:8000") as client:
            yield client
    finally:
        torch.set_num_threads(threads)


def ask_body(**extra: Any) -> dict[str, Any]:
    return {"model": "nest", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS, **extra}


def test_the_cli_reports_both_replicas_running(ray_server: Served) -> None:
    text = ray_server.log.read_text(encoding="utf-8", errors="replace")
    assert f"{ray_server.base}/v1 on Ray Serve: 2 replica(s) running" in text


def test_answer_and_citations_are_the_plain_servers(ray_server: Served, plain: Any) -> None:
    r = httpx.post(f"{ray_server.base}/v1/chat/completions", json=ask_body(), timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    message = body["choices"][0]["message"]
    assert ANSWER in message["content"]
    nest = body["nest"]
    sources = {s["id"]: s for s in nest["sources"]}
    gold = [c for c in nest["citations"] if ANSWER in c["text"]]
    assert gold, nest["citations"]
    for c in nest["citations"]:
        assert message["content"][c["start_index"]:c["end_index"]] == c["text"] == \
            sources[c["passage_id"]]["text"][c["src_start"]:c["src_end"]]
    assert sources[gold[0]["passage_id"]]["metadata"]["source"].endswith("history.md")
    assert message["annotations"][0]["type"] == "url_citation"

    reference = plain.post("/v1/chat/completions", json=ask_body())
    assert reference.status_code == 200
    expected = reference.json()
    assert message == expected["choices"][0]["message"]
    assert nest["citations"] == expected["nest"]["citations"]
    assert nest["sources"] == expected["nest"]["sources"]


def test_streaming_through_ray_serve(ray_server: Served, plain: Any) -> None:
    import json

    events: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{ray_server.base}/v1/chat/completions",
                      json=ask_body(stream=True), timeout=300) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e["choices"])
    expected = plain.post("/v1/chat/completions", json=ask_body()).json()
    assert text == expected["choices"][0]["message"]["content"]
    last = next(e for e in events if e["choices"] and e["choices"][0]["finish_reason"])
    assert last["nest"]["citations"] == expected["nest"]["citations"]


def test_both_replicas_answer(ray_server: Served) -> None:
    """Every response names the replica that sent it; Ray's proxy spreads requests over
    both (sequential probes: 2 of 24 would all go to one with odds 2 / 2**24)."""
    seen: set[str] = set()
    for _ in range(24):
        r = httpx.get(f"{ray_server.base}/health", timeout=30)
        assert r.status_code == 200
        assert r.json()["status"] == "ok"
        seen.add(r.headers[REPLICA_HEADER])
    assert len(seen) == 2, seen


BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("unknown model", {"json": {**ask_body(), "model": "gpt-4o"}}),
    ("max_tokens over the limit", {"json": ask_body(max_tokens=500)}),
    ("not JSON", {"content": b"{oops", "headers": {"content-type": "application/json"}}),
    ("not declared JSON", {"content": b"{}", "headers": {"content-type": "text/plain"}}),
    ("foreign Host", {"json": ask_body(), "headers": {"host": "rebound.example"}}),
    ("temperature", {"json": ask_body(temperature=0.7)}),
]


def test_bad_requests_get_the_plain_servers_errors(ray_server: Served, plain: Any) -> None:
    for what, kwargs in BAD_REQUESTS:
        got = httpx.post(f"{ray_server.base}/v1/chat/completions", timeout=60, **kwargs)
        expected = plain.post("/v1/chat/completions", **kwargs)
        assert 400 <= got.status_code < 500, what
        assert (got.status_code, got.json()) == (expected.status_code, expected.json()), what


def test_past_capacity_requests_are_refused_never_lost(ray_server: Served) -> None:
    """2 replicas x (1 answering + 1 queued): of 6 simultaneous requests at least 2 get 429
    at once; every request gets a response, every answer the right one."""
    statuses, answers = burst(ray_server.base, ask_body(max_tokens=8), 6)
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) >= 2
    assert statuses.count(200) >= 2
    assert all(a.startswith("The Zephyr Widget Company") for a in answers), answers


def test_sigterm_takes_the_cluster_down(ray_server: Served) -> None:
    """Last: SIGTERM stops the app, the replicas and the local Ray cluster (its GCS, raylet
    and workers are this process's descendants), and the command exits 0."""
    assert ray_server.descendants, "no Ray processes under nest serve --ray?"
    ray_server.proc.terminate()
    assert ray_server.proc.wait(timeout=60) == 0, ray_server.log.read_text()[-3000:]
    _, alive = psutil.wait_procs(ray_server.descendants, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{ray_server.base}/health", timeout=5)


def test_on_a_running_cluster_it_answers_and_leaves_the_cluster_up(
        store: Path, plain: Any, tmp_path: Path) -> None:
    """``--ray-address``: a cluster someone already runs (started here, as ``ray start
    --head`` would): one replica answers with the plain server's citations; SIGTERM removes
    this app only, and the cluster, with Ray Serve on it, stays up for its other users."""
    import ray
    from ray import serve

    from nest_core.app.ray_serve import APP_NAME

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        port, log = free_port(), tmp_path / "stderr.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [*NEST, "serve", "--ray", "--replicas", "1", "--ray-address",
                 ray.get_runtime_context().gcs_address, "--store", str(store), "--port",
                 str(port), "--max-concurrent", "1", "--max-queue", "1",
                 "--max-tokens-limit", "64"],
                env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                stderr=err, text=True)
        try:
            wait_until_serving(
                proc, lambda: "1 replica(s) running" in log.read_text(errors="replace"),
                STARTUP_SECONDS, lambda: f"nest serve --ray-address: {log.read_text()[-4000:]}")
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=ask_body(),
                           timeout=300)
            assert r.status_code == 200, r.text
            expected = plain.post("/v1/chat/completions", json=ask_body()).json()
            assert r.json()["choices"][0]["message"] == expected["choices"][0]["message"]
            assert r.json()["nest"]["citations"] == expected["nest"]["citations"]
            assert ANSWER in r.json()["choices"][0]["message"]["content"]
            proc.terminate()
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            _stop(proc)
        actors = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert "SERVE_CONTROLLER_ACTOR" in actors  # Ray Serve still runs for the others
        assert APP_NAME not in serve.status().applications  # this app is gone
        assert ray.cluster_resources().get("CPU") == 2  # the cluster is not
    finally:
        ray.shutdown()
