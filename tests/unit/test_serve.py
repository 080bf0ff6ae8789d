"""The OpenAI-compatible server in-process (FastAPI's TestClient over the real ASGI app, the
tiny random Llama, a real in-memory store with hashing embeddings): response shapes, exact
citations, SSE streaming, every refusal as an OpenAI error body, admission control. The real
server process on a loopback port, with the ``openai`` client and ``ChatOpenAI``, is in
tests/integration/test_serve_process.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from nest_core.app.openai_api import ApiError
from nest_core.app.serve import Gate, ServeLimits, create_app
from nest_core.app.service import AnswerService
from nest_core.config import paper_config
from nest_core.stores.embeddings import HashingEmbeddings
from nest_core.stores.sources.memory import InMemorySource
from nest_core.types import Passage
from tests.conftest import TINY_CORPUS

QUESTION = "Who founded the Zephyr Widget Company?"
PASSAGES = [Passage(id=f"p{i}", text=t, title=f"T{i}", metadata={"source": f"doc{i}.txt"})
            for i, t in enumerate(TINY_CORPUS)]


@pytest.fixture(scope="module")
def service(tiny_lm: Any) -> AnswerService:
    # the paper's settings (passages as the copy datastore only): a random model's answer
    # then has whole-word citations with content, and no support check (nothing shown)
    return AnswerService(InMemorySource(PASSAGES, embed=HashingEmbeddings(64)), tiny_lm, k=3,
                         config=paper_config(tiny_lm.name))


@pytest.fixture
def client(service: AnswerService) -> TestClient:
    return TestClient(create_app(service, ServeLimits(max_tokens=64)))


def ask(**overrides: Any) -> dict[str, Any]:
    return {"model": "nest", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 16, **overrides}


def events(response: Any) -> list[Any]:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models(client: TestClient, service: AnswerService) -> None:
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": "tiny-llama", "decoding": 0, "queued": 0,
                      "capacity": 10}
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama", "nest"]


def test_completion_carries_exact_citations(client: TestClient, service: AnswerService
                                            ) -> None:
    body = client.post("/v1/chat/completions", json=ask()).json()
    (choice,) = body["choices"]
    content = choice["message"]["content"]
    request = service.stream.__self__  # the same service decodes the same answer
    _, expected = request.answer(_parsed(ask()))
    assert content == expected.text
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    nest = body["nest"]
    assert nest["citations"], "the tiny model copies from the passages"
    texts = {s["id"]: s["text"] for s in nest["sources"]}
    for c in nest["citations"]:
        assert content[c["start_index"]:c["end_index"]] == c["text"] == \
            texts[c["passage_id"]][c["src_start"]:c["src_end"]]
    assert [(a["url_citation"]["start_index"], a["url_citation"]["end_index"])
            for a in choice["message"]["annotations"]] == \
        [(c["start_index"], c["end_index"]) for c in nest["citations"]]
    assert {a["url_citation"]["url"] for a in choice["message"]["annotations"]} <= {
        Path(f"doc{i}.txt").resolve().as_uri() for i in range(len(PASSAGES))}
    assert set(nest["retrieved"]) >= {c["passage_id"] for c in nest["citations"]}


def test_stream_adds_up_to_the_completion(client: TestClient) -> None:
    plain = client.post("/v1/chat/completions", json=ask()).json()
    with client.stream("POST", "/v1/chat/completions",
                       json=ask(stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        r.read()
        got = events(r)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    last, usage = chunks[-2], chunks[-1]
    assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert last["nest"]["citations"] == plain["nest"]["citations"]
    assert usage["choices"] == []
    assert usage["usage"] == plain["usage"]


@pytest.mark.parametrize(("body", "status", "match"), [
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served"),
    (ask(messages=[]), 400, "non-empty list"),
    (ask(messages=[{"role": "user", "content": 3}]), 400, "string or a list of text"),
    (ask(messages=[{"role": "wizard", "content": "hi"}]), 400, "needs a role"),
    (ask(messages=[{"role": "system", "content": "be brief"}]), 400, "no user message"),
    (ask(max_tokens=65), 400, "from 1 to 64"),
    (ask(max_tokens="8"), 400, "from 1 to 64"),
    (ask(temperature=0.7), 400, "greedily"),
    (ask(n=2), 400, "n must be 1"),
    (ask(tools=[{"type": "function"}]), 400, "nest mcp"),
    (ask(response_format={"type": "json_object"}), 400, "parse the answer text"),
    (ask(stop=["a", "b", "c", "d", "e"]), 400, "at most 4"),
    (ask(stream="yes"), 400, "true or false"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests_get_openai_errors(client: TestClient, body: Any, status: int,
                                        match: str) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert match in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_oversized_and_unknown(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_request_error")
    huge = ask(messages=[{"role": "user", "content": "x" * 300_000}])
    r = client.post("/v1/chat/completions", json=huge)
    assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large")
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert "error" in r.json()


def test_api_key(service: AnswerService) -> None:
    client = TestClient(create_app(service, api_key="s3cret"))
    r = client.post("/v1/chat/completions", json=ask())
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key")
    r = client.post("/v1/chat/completions", json=ask(),
                    headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert client.get("/health").status_code == 200  # health checks need no key
    assert client.get("/metrics").status_code == 200  # nor do metrics scrapers


def test_gate_queues_with_a_bound_then_refuses() -> None:
    async def scenario() -> list[Any]:
        gate = Gate(ServeLimits(max_concurrent=1, max_queue=1, queue_seconds=0.05))
        gate.enter()
        await gate.slot()  # decoding
        gate.enter()  # queued
        outcomes: list[Any] = []
        try:
            gate.enter()
        except ApiError as err:
            outcomes.append((err.status, err.code))
        try:
            await gate.slot()  # the queued request waits, then gives up
        except ApiError as err:
            outcomes.append((err.status, err.code))
        gate.leave(had_slot=False)
        gate.leave(had_slot=True)
        gate.enter()
        await gate.slot()  # free again
        outcomes.append((gate.inside, gate.decoding))
        return outcomes

    assert asyncio.run(scenario()) == [(429, "queue_full"), (503, "queue_timeout"), (1, 1)]


def _parsed(body: dict[str, Any]) -> Any:
    from nest_core.app.openai_api import parse_request

    return parse_request(body, model_ids=("tiny-llama", "nest"), max_tokens_limit=64,
                         default_max_tokens=16, max_messages=64)


def test_an_empty_store_gets_plain_answers_without_citations(tiny_lm: Any) -> None:
    empty = AnswerService(InMemorySource([], embed=HashingEmbeddings(64)), tiny_lm, k=3)
    body = TestClient(create_app(empty)).post("/v1/chat/completions", json=ask()).json()
    assert body["choices"][0]["message"]["content"]
    assert (body["nest"]["citations"], body["nest"]["retrieved"]) == ([], [])
    assert body["choices"][0]["message"]["annotations"] == []
