"""``nest mcp`` in-process: the MCP SDK's own client (``mcp.Client``) connected to the real
server object over the tiny random Llama and a real in-memory store. The tool schemas state
their bounds; a bad argument comes back as an error result that says why (a ``ToolError``),
never the SDK's bare "Error executing tool" of a crash. The stdio process is in
tests/integration/test_serve_process.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("mcp")

from nest_core.app.mcp_server import MAX_K, MAX_TOKENS, build_server
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
    return AnswerService(InMemorySource(PASSAGES, embed=HashingEmbeddings(64)), tiny_lm, k=3,
                         config=paper_config(tiny_lm.name))


def session(service: AnswerService, calls: list[tuple[str, dict[str, Any]]]
            ) -> tuple[Any, list[Any]]:
    """The tool list and the results of ``calls``, through one client session."""
    from mcp import Client

    async def run() -> tuple[Any, list[Any]]:
        async with Client(build_server(service)) as client:
            tools = await client.list_tools()
            return tools, [await client.call_tool(name, args) for name, args in calls]

    return asyncio.run(run())


def text_of(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def test_tool_schemas_state_their_bounds(service: AnswerService) -> None:
    tools, _ = session(service, [])
    schemas = {t.name: t.input_schema for t in tools.tools}
    ask, search = schemas["ask"]["properties"], schemas["search"]["properties"]
    assert (ask["max_tokens"]["minimum"], ask["max_tokens"]["maximum"]) == (1, MAX_TOKENS)
    assert (search["k"]["minimum"], search["k"]["maximum"]) == (1, MAX_K)
    for field in (ask["question"], search["query"]):
        assert field["minLength"] == 1
        assert field["pattern"] == r"\S"
    assert schemas["ask"]["required"] == ["question"]


@pytest.mark.parametrize(("name", "args", "reason"), [
    ("ask", {"question": QUESTION, "max_tokens": 0}, "max_tokens"),
    ("ask", {"question": QUESTION, "max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ("ask", {"question": "   "}, "question"),
    ("ask", {"question": ""}, "question"),
    ("ask", {"question": "widget " * 400}, "the prompt is"),
    ("search", {"query": QUESTION, "k": 0}, "k"),
    ("search", {"query": QUESTION, "k": "many"}, "k"),
])
def test_bad_arguments_reach_the_agent_with_the_reason(service: AnswerService, name: str,
                                                       args: dict[str, Any],
                                                       reason: str) -> None:
    _, (result,) = session(service, [(name, args)])
    assert result.is_error
    text = text_of(result)
    assert reason in text
    assert text != f"Error executing tool {name}"  # what a crash would say, and no more


def test_a_good_call_answers_with_the_citations(service: AnswerService) -> None:
    from nest_core.app.openai_api import ChatRequest

    _, (asked, found) = session(service, [("ask", {"question": QUESTION, "max_tokens": 16}),
                                          ("search", {"query": QUESTION, "k": 2})])
    assert not asked.is_error
    data = asked.structured_content
    _, result = service.answer(ChatRequest(messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=16, stop=[], stream=False,
                                           include_usage=False))
    assert data["answer"] == result.text
    assert [(c["start_index"], c["end_index"]) for c in data["citations"]] == \
        [(s.out_start, s.out_end) for s in result.cited_spans()]
    assert data["citations"], "the tiny model's answer has citations"
    assert [p["rank"] for p in found.structured_content["passages"]] == [1, 2]
