"""NestQueryEngineTool inside LlamaIndex's own FunctionAgent (tiny random Llama), driven by
``MockFunctionCallingLLM`` with a scripted policy: the tool output lists its sources."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.base.response.schema import Response
from llama_index.core.llms import MockFunctionCallingLLM
from llama_index.core.schema import NodeWithScore, TextNode
from test_llama_index_engine import COPIED, COPY_HEAVY, QUESTION, ListRetriever, corpus_nodes

from nest_integrations.llama_index import NestQueryEngine, NestQueryEngineTool
from nest_integrations.llama_index.tools import format_sources


def scripted(messages, **kwargs):
    """Call the tool with the user's question once, then relay what it returned."""
    results = [m for m in messages if m.role == MessageRole.TOOL]
    if results:
        return ChatMessage(role=MessageRole.ASSISTANT, content=results[-1].content)
    question = next(m.content for m in reversed(messages) if m.role == MessageRole.USER)
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=[ToolCallBlock(
        tool_call_id="c1", tool_name="corpus", tool_kwargs={"input": question})])


@pytest.fixture
def tool(tiny_lm):
    engine = NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                             max_new_tokens=24, config=COPY_HEAVY)
    return NestQueryEngineTool.from_defaults(engine, name="corpus",
                                             description="Answers about the corpus.")


async def test_function_agent_gets_the_cited_answer_with_its_sources(tool):
    agent = FunctionAgent(tools=[tool], llm=MockFunctionCallingLLM(
        response_generator=scripted))
    handler = agent.run(user_msg=QUESTION)
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    final = await handler
    [result] = results
    output = result.tool_output
    response = output.raw_output
    assert isinstance(response, Response)
    assert response.response == COPIED
    assert output.content == format_sources(response)
    assert output.content == (COPIED + '\n\nSources:\n[1] node node-0: "Ostrava."\n'
                              '[4] node node-3: "Pack my box with five dozen liquor jugs"')
    for s in response.metadata["nest_spans"]:
        assert f'"{s["cited_text"].strip()}"' in output.content
    assert final.response.content == output.content  # what the agent relayed


def test_sync_call_and_format(tool):
    output = tool.call(QUESTION)
    assert output.raw_input == {"input": QUESTION}
    assert output.content.splitlines()[2] == "Sources:"


def test_format_sources_names_files_and_leaves_uncited_answers_alone():
    node = TextNode(id_="n1", text="The office opened in 2019.",
                    metadata={"file_name": "02-offices.md"})
    cited = Response("It opened in 2019.", source_nodes=[NodeWithScore(node=node, score=1.0)],
                     metadata={"nest_spans": [{"out_start": 3, "out_end": 17,
                                               "cited_text": "opened in 2019",
                                               "source_index": 1}],
                               "nest_matches": []})
    assert format_sources(cited) == ('It opened in 2019.\n\nSources:\n'
                                     '[1] 02-offices.md: "opened in 2019"')
    assert format_sources(Response("Empty Response", metadata={"nest_spans": []})) == \
        "Empty Response"


def test_streaming_engines_and_other_engines_are_refused(tiny_lm):
    streaming = NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                                streaming=True)
    with pytest.raises(ValueError, match="streaming=False"):
        NestQueryEngineTool.from_defaults(streaming)
    with pytest.raises(TypeError, match="use QueryEngineTool"):
        NestQueryEngineTool.from_defaults(object())
