"""``nest serve`` and ``nest mcp`` as users run them: real server processes over a real store
on disk, called with the official ``openai`` client, LangChain's ``ChatOpenAI`` and the MCP
client library over stdio. The corpus is two made-up files (the answer is unknowable to the
model), indexed with ``nest index`` first."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import free_port, stop_process, wait_until_serving  # noqa: E402

from tests.integration.serving import burst, index_handbook  # noqa: E402
from tests.integration.test_cli import NEST, QUESTION  # noqa: E402

pytestmark = pytest.mark.integration

ANSWER = "1987"
STARTUP_SECONDS = 300


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return index_handbook(tmp_path_factory)


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[str]:
    """``nest serve`` on a loopback port with room for 1 answer + 1 queued request."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*NEST, "serve", "--store", str(store), "--port", str(port),
                             "--max-concurrent", "1", "--max-queue", "1",
                             "--max-tokens-limit", "64"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def failure() -> str:
        if proc.poll() is None:
            return "nest serve did not come up"
        return f"nest serve exited: {proc.stderr.read() if proc.stderr else ''}"

    try:
        wait_until_serving(proc, healthy, STARTUP_SECONDS, failure)
        yield base
    finally:
        stop_process(proc, 30)


def ask_body(**extra: Any) -> dict[str, Any]:
    return {"model": "nest", "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 24, **extra}


def test_openai_client_gets_the_answer_and_its_citations(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert "nest" in [m.id for m in client.models.list()]
    completion = client.chat.completions.create(
        model="nest", messages=[{"role": "user", "content": QUESTION}], max_tokens=24)
    message = completion.choices[0].message
    assert ANSWER in message.content
    nest = completion.model_extra["nest"]
    sources = {s["id"]: s for s in nest["sources"]}
    gold = [c for c in nest["citations"] if ANSWER in c["text"]]
    assert gold, nest["citations"]
    for c in nest["citations"]:
        assert message.content[c["start_index"]:c["end_index"]] == c["text"] == \
            sources[c["passage_id"]]["text"][c["src_start"]:c["src_end"]]
    assert sources[gold[0]["passage_id"]]["metadata"]["source"].endswith("history.md")
    urls = [a.url_citation for a in message.annotations]
    assert [(u.start_index, u.end_index) for u in urls] == \
        [(c["start_index"], c["end_index"]) for c in nest["citations"]]

    stream = client.chat.completions.create(
        model="nest", messages=[{"role": "user", "content": QUESTION}], max_tokens=24,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert last.model_extra["nest"]["citations"] == nest["citations"]
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    # the stream's annotations: one delta of their own, after the text, before the finish
    (noted,) = [c for c in chunks if c.choices and c.choices[0].delta.model_extra
                and "annotations" in c.choices[0].delta.model_extra]
    assert noted.choices[0].delta.model_extra["annotations"] == \
        [a.model_dump() for a in message.annotations]
    assert chunks.index(noted) == chunks.index(last) - 1


def test_chat_openai_on_the_responses_api_gets_the_citations(server: str) -> None:
    """``ChatOpenAI(use_responses_api=True)``: the answer's text block carries the
    ``url_citation`` annotations (absolute URLs), invoked and streamed alike."""
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="nest", max_tokens=24,
                      max_retries=0, use_responses_api=True)
    message = chat.invoke(QUESTION)
    (block,) = message.content
    text, annotations = block["text"], block["annotations"]
    assert ANSWER in text
    gold = [a for a in annotations if ANSWER in text[a["start_index"]:a["end_index"]]]
    assert gold, annotations
    assert gold[0]["type"] == "url_citation"
    assert gold[0]["url"].startswith("file:///")
    assert gold[0]["url"].endswith("history.md")
    merged: Any = None
    for piece in chat.stream(QUESTION):
        merged = piece if merged is None else merged + piece
    (streamed,) = merged.content
    assert (streamed["text"], streamed["annotations"]) == (text, annotations)


def test_legacy_completions(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    plain = client.completions.create(model="nest", prompt=QUESTION, max_tokens=24)
    assert ANSWER in plain.choices[0].text
    assert any(ANSWER in c["text"] for c in plain.model_extra["nest"]["citations"])
    chunks = list(client.completions.create(model="nest", prompt=QUESTION, max_tokens=24,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text


def test_chat_openai_works_against_it(server: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="nest", max_tokens=24,
                      max_retries=0)
    message = chat.invoke(QUESTION)
    assert ANSWER in message.text
    streamed = "".join(chunk.text for chunk in chat.stream(QUESTION))
    assert streamed == message.text


def test_errors_are_openai_shaped(server: str) -> None:
    from openai import BadRequestError, NotFoundError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": QUESTION}])
    with pytest.raises(BadRequestError, match="from 1 to 64"):
        client.chat.completions.create(model="nest", max_tokens=500, messages=[
            {"role": "user", "content": QUESTION}])
    long = "The handbook says nothing on this. " * 1200  # past SmolLM2's 8,192 tokens
    with pytest.raises(BadRequestError, match=r"the prompt is \d+ tokens; this model's "
                                              r"context window is 8192 tokens"):
        client.chat.completions.create(model="nest", max_tokens=24, messages=[
            {"role": "user", "content": long + QUESTION}])
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{oops",
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_past_capacity_requests_are_refused_never_lost(server: str) -> None:
    """1 answering + 1 queued: of 5 simultaneous requests, the rest get 429 at once; every
    request gets a response, and every answer is the right one."""
    statuses, answers = burst(server, ask_body(), 5)
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 1
    assert statuses.count(429) >= 1
    assert all(ANSWER in a for a in answers)
    assert httpx.get(f"{server}/health", timeout=5).json()["queued"] == 0


def test_mcp_tools_over_stdio(store: Path) -> None:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=NEST[0], args=[*NEST[1:], "mcp", "--store", str(store)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"})

    async def session_calls() -> tuple[Any, Any, Any, Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            asked = await session.call_tool("ask", {"question": QUESTION, "max_tokens": 24})
            found = await session.call_tool("search", {"query": QUESTION, "k": 2})
            bad = await session.call_tool("ask", {"question": QUESTION, "max_tokens": 0})
            return tools, asked, found, bad

    tools, asked, found, bad = asyncio.run(session_calls())
    assert {t.name for t in tools.tools} == {"ask", "search"}
    assert getattr(bad, "is_error", getattr(bad, "isError", False))
    assert "max_tokens" in bad.content[0].text  # the reason, not a bare "Error executing"
    result = _structured(asked)
    assert ANSWER in result["answer"]
    assert any(ANSWER in c["text"] and c["source"].endswith("history.md")
               for c in result["citations"])
    assert "[1]" in result["cited_answer"] or "[~1]" in result["cited_answer"]
    passages = _structured(found)["passages"]
    assert [p["rank"] for p in passages] == [1, 2]
    assert passages[0]["source"].endswith("history.md")


def _structured(result: Any) -> dict[str, Any]:
    assert not getattr(result, "is_error", getattr(result, "isError", False)), result
    data = getattr(result, "structured_content", None) or getattr(
        result, "structuredContent", None)
    if data is None:
        data = json.loads(result.content[0].text)
    return data.get("result", data) if set(data) == {"result"} else data


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("loopback server tests run on POSIX", allow_module_level=True)


def test_a_question_the_store_does_not_answer_gets_the_abstention(server: str,
                                                                  store: Path) -> None:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from openai import OpenAI

    off_topic = "What is the capital of France?"
    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="nest", messages=[{"role": "user", "content": off_topic}], max_tokens=16)
    message = completion.choices[0].message
    assert message.content == "The documents do not say."
    assert not message.annotations
    assert completion.model_extra["nest"]["abstained"] is True
    assert completion.model_extra["nest"]["citations"] == []

    params = StdioServerParameters(
        command=NEST[0], args=[*NEST[1:], "mcp", "--store", str(store)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"})

    async def ask() -> Any:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return await session.call_tool("ask", {"question": off_topic, "max_tokens": 16})

    result = _structured(asyncio.run(ask()))
    assert result["abstained"] is True
    assert result["answer"] == "The documents do not say."
    assert result["citations"] == []


def test_a_batching_server_answers_concurrent_clients_as_each_alone(store: Path) -> None:
    """``nest serve --batching``: four clients at once (the paper's decoding, long answers,
    so their steps overlap) get the answers and citations each gets alone, and /metrics shows
    model calls that ran several answers' forwards."""
    port = free_port()
    proc = subprocess.Popen([*NEST, "serve", "--store", str(store), "--port", str(port),
                             "--batching", "--mode", "nest"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    questions = [QUESTION, "How many days of paid leave does an employee receive?",
                 "What does the Zephyr Widget Company make?", "Who founded the company?"]

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def ask(question: str) -> dict[str, Any]:
        body = {"model": "nest", "max_tokens": 40,
                "messages": [{"role": "user", "content": question}]}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return {"text": r.json()["choices"][0]["message"]["content"],
                "citations": r.json()["nest"]["citations"]}

    def metric(name: str) -> float:
        text = httpx.get(f"{base}/metrics", timeout=30).text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith(name + " ")))

    try:
        wait_until_serving(proc, healthy, STARTUP_SECONDS, lambda: "nest serve --batching "
                           "did not come up")
        alone = [ask(q) for q in questions]
        before = metric("nest_model_forwards"), metric("nest_forward_calls_total")
        together: dict[int, dict[str, Any]] = {}
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(
            questions[i]))) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [together[i] for i in range(len(questions))] == alone
        assert ANSWER in alone[0]["text"]
        model_calls = metric("nest_model_forwards") - before[0]
        forward_calls = metric("nest_forward_calls_total") - before[1]
        assert forward_calls > model_calls > 0  # some model calls ran several answers' steps
    finally:
        stop_process(proc, 30)
