"""A LlamaIndex agent calls a Nest query engine as a tool; the tool's output shows its sources.

The handbook in examples/data is loaded with ``SimpleDirectoryReader``, split with
``SentenceSplitter`` and embedded with the bundled MiniLM; the tool is a
``NestQueryEngineTool`` (a ``QueryEngineTool`` whose output lists the sources it copied
from) over a ``NestQueryEngine`` that answers with the bundled SmolLM2. Runs offline.

About the agent's own LLM: SmolLM2-135M cannot call tools reliably, so this example drives
LlamaIndex's ``FunctionAgent`` with ``MockFunctionCallingLLM`` and a scripted policy (call
the handbook tool with the user's question, then answer with what the tool returned). Put
any function-calling LLM there instead (``llm=OpenAI(...)``, ``llm=Ollama(...)``...): the tool
and its cited output stay the same.

    python examples/llamaindex_agent.py "When did the Ghent office open?"
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
TOOL = "handbook"


def scripted_policy(messages, **kwargs):
    """The stand-in for a tool-calling LLM: ask the tool once, then relay its answer."""
    from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock

    tool_results = [m for m in messages if m.role == MessageRole.TOOL]
    if tool_results:
        return ChatMessage(role=MessageRole.ASSISTANT, content=tool_results[-1].content)
    question = next(m.content for m in reversed(messages) if m.role == MessageRole.USER)
    call = ToolCallBlock(tool_call_id="call-1", tool_name=TOOL, tool_kwargs={"input": question})
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=[call])


def build_tool(embed_model, max_new_tokens: int):
    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    from nest_integrations.llama_index import NestQueryEngine, NestQueryEngineTool

    documents = SimpleDirectoryReader(str(DATA)).load_data()
    index = VectorStoreIndex.from_documents(
        documents, embed_model=embed_model,
        transformations=[SentenceSplitter(chunk_size=160, chunk_overlap=20)])
    engine = NestQueryEngine.from_index(index, similarity_top_k=3,
                                        max_new_tokens=max_new_tokens)
    return NestQueryEngineTool.from_defaults(
        engine, name=TOOL,
        description="Answers questions about Halvorsen Orchard Robotics' staff handbook "
                    "(offices, products, time off, expenses), citing the handbook pages.")


async def run(question: str, max_new_tokens: int) -> None:
    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
    from llama_index.core.llms import MockFunctionCallingLLM

    from nest_integrations.llama_index import bundled_embedding

    tool = build_tool(bundled_embedding(), max_new_tokens)
    agent = FunctionAgent(tools=[tool], llm=MockFunctionCallingLLM(
        response_generator=scripted_policy))
    print(f"User: {question}")
    handler = agent.run(user_msg=question)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            print(f"\nTool call {event.tool_name}({event.tool_kwargs}) returned:")
            print("  " + event.tool_output.content.replace("\n", "\n  "))
            print_spans(event.tool_output.raw_output)
    final = await handler
    print(f"\nAgent: {final.response.content}")


def print_spans(response) -> None:
    """Where each copied span of the tool's answer came from (file and character range)."""
    print("  Spans:")
    for s in response.metadata["nest_spans"]:
        node = response.source_nodes[s["source_index"] - 1].node
        print(f"    answer[{s['out_start']}:{s['out_end']}] <- "
              f"{node.metadata.get('file_name')} chars {s.get('doc_start')}-{s.get('doc_end')}"
              f": {s['cited_text']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="When did the Ghent office open?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    asyncio.run(run(args.question, args.max_new_tokens))


if __name__ == "__main__":
    main()
