"""``GET /metrics`` in-process: a fresh app (its own registry) over the tiny random Llama,
a known mix of requests, then the Prometheus text parsed back with prometheus-client's own
parser and every count checked against what the requests returned."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from nest_core.app.serve import ServeLimits, create_app
from nest_core.app.service import AnswerService
from nest_core.config import default_config, paper_config
from nest_core.stores.embeddings import HashingEmbeddings
from nest_core.stores.sources.memory import InMemorySource
from nest_core.types import Passage
from tests.conftest import TINY_CORPUS

QUESTION = "Who founded the Zephyr Widget Company?"
PASSAGES = [Passage(id=f"p{i}", text=t, title=f"T{i}", metadata={"source": f"doc{i}.txt"})
            for i, t in enumerate(TINY_CORPUS)]
CHAT, RESPONSES = "/v1/chat/completions", "/v1/responses"


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_requests_answers_and_tokens(tiny_lm: Any) -> None:
    service = AnswerService(InMemorySource(PASSAGES, embed=HashingEmbeddings(64)), tiny_lm,
                            k=3, config=paper_config(tiny_lm.name))
    client = TestClient(create_app(service, ServeLimits(max_tokens=64)))
    chat = client.post(CHAT, json={"model": "nest", "max_tokens": 8,
                                   "messages": [{"role": "user", "content": QUESTION}]})
    assert chat.status_code == 200
    assert client.post(CHAT, json={"model": "nest", "messages": []}).status_code == 400
    with client.stream("POST", RESPONSES, json={"model": "nest", "input": QUESTION,
                                                 "max_output_tokens": 12,
                                                 "stream": True}) as streamed:
        streamed.read()
    assert streamed.status_code == 200
    assert client.get("/v1/nothing").status_code == 404

    got = samples(client)
    assert got[("nest_requests_total", (("route", CHAT), ("status", "200")))] == 1
    assert got[("nest_requests_total", (("route", CHAT), ("status", "400")))] == 1
    assert got[("nest_requests_total", (("route", RESPONSES), ("status", "200")))] == 1
    assert got[("nest_requests_total", (("route", "unmatched"), ("status", "404")))] == 1
    assert got[("nest_request_seconds_count", (("route", CHAT),))] == 2
    assert got[("nest_request_seconds_count", (("route", RESPONSES),))] == 1
    assert got[("nest_answers_total", ())] == 2
    assert got[("nest_cited_answers_total", ())] == 2  # the tiny model's answers cite
    assert got[("nest_abstentions_total", ())] == 0
    tokens = chat.json()["usage"]["completion_tokens"] + 12  # the stream ran to its limit
    assert '"status":"incomplete"' in streamed.text.replace(" ", "")
    assert got[("nest_generated_tokens_total", ())] == tokens
    assert got[("nest_requests_in_flight", ())] == 1  # this scrape
    assert (got[("nest_decoding", ())], got[("nest_queued", ())]) == (0, 0)
    again = samples(client)  # the first scrape is counted now
    assert again[("nest_requests_total", (("route", "/metrics"), ("status", "200")))] == 1


def test_abstentions_are_counted(tiny_lm: Any) -> None:
    # the highest threshold: a question is far unless it is a passage word for word
    config = default_config(tiny_lm.name, abstain_below=1.0, abstention="Not in the documents.")
    service = AnswerService(InMemorySource(PASSAGES, embed=HashingEmbeddings(64)), tiny_lm,
                            k=3, config=config)
    client = TestClient(create_app(service))
    body = client.post(CHAT, json={"model": "nest", "max_tokens": 8,
                                   "messages": [{"role": "user", "content": QUESTION}]}).json()
    assert body["nest"]["abstained"] is True
    got = samples(client)
    assert (got[("nest_answers_total", ())], got[("nest_abstentions_total", ())]) == (1, 1)
    assert got[("nest_generated_tokens_total", ())] == 0


@pytest.mark.parametrize("batching", [True, False])
def test_metrics_count_forward_calls_and_the_model_calls_that_ran_them(
        tiny_lm: Any, batching: bool) -> None:
    """Tokens per model call is one division: without batching every forward an answer asks
    for is a model call; with it, the batcher's count (one call may run several answers')."""
    service = AnswerService(InMemorySource(PASSAGES, embed=HashingEmbeddings(64)), tiny_lm,
                            k=3, config=paper_config(tiny_lm.name), batching=batching)
    client = TestClient(create_app(service, ServeLimits(max_tokens=64)))
    before = service.model_forwards
    r = client.post(CHAT, json={"model": "nest", "max_tokens": 8,
                                "messages": [{"role": "user", "content": QUESTION}]})
    assert r.status_code == 200
    got = samples(client)
    calls = got[("nest_forward_calls_total", ())]
    assert calls >= 2  # the prompt, then at least one step
    if batching:
        assert service.model_forwards - before == calls  # one request alone: nothing shared
        assert got[("nest_model_forwards", ())] == service.model_forwards
    else:
        assert service.model_forwards is None
        assert got[("nest_model_forwards", ())] == calls
