"""Nest as a tool of a LangGraph agent: the agent's answer carries Nest's citations, offline.

    python examples/langchain_agent.py ["your question"]

``ChatNest(...).as_tool()`` is a typed tool (``{"query": str}``) that returns the cited answer
as its content (what the agent's model reads) and the citations, spans and source documents
as its artifact (what your application reads from the final state). A 135M model cannot
call tools, so this example drives the agent with a scripted tool-calling model; put your
own tool-calling chat model (ChatOpenAI, ChatOllama, ...) in its place.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_text_splitters import RecursiveCharacterTextSplitter

from nest_integrations.langchain import ChatNest, NestMiniLMEmbeddings

DATA = Path(__file__).parent / "data"
QUESTION = "Who founded Halvorsen Orchard Robotics, and when?"


class ScriptedToolCaller(BaseChatModel):
    """Stands in for a tool-calling model: asks the first tool the user's question, then
    answers with what the tool returned."""

    tool_name: str = ""

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-caller"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.model_copy(update={"tool_name": tools[0].name})

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        last = messages[-1]
        reply = (AIMessage(content=last.text) if isinstance(last, ToolMessage) else AIMessage(
            content="", tool_calls=[{"name": self.tool_name, "args": {"query": last.text},
                                     "id": "call-1"}]))
        return ChatResult(generations=[ChatGeneration(message=reply)])


def handbook_store() -> InMemoryVectorStore:
    docs = [Document(page_content=p.read_text(encoding="utf-8"), metadata={"source": p.name})
            for p in sorted(DATA.glob("*.md"))]
    splitter = RecursiveCharacterTextSplitter(chunk_size=400, chunk_overlap=0,
                                              add_start_index=True)
    return InMemoryVectorStore.from_documents(splitter.split_documents(docs),
                                              NestMiniLMEmbeddings())


def main() -> None:
    from langchain.agents import create_agent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    args = parser.parse_args()

    tool = ChatNest(vectorstore=handbook_store(), k=4, max_tokens=48).as_tool(name="handbook")
    agent = create_agent(ScriptedToolCaller(), [tool])
    state = agent.invoke({"messages": [HumanMessage(args.question)]})

    print(f"Q: {args.question}\n\nAgent's answer:\n{state['messages'][-1].text}\n")
    tool_message = next(m for m in state["messages"] if isinstance(m, ToolMessage))
    sources = {d.id: d for d in tool_message.artifact["source_documents"]}
    print("Where each cited span came from (tool artifact):")
    for c in tool_message.artifact["citations"]:
        doc = sources[c["extras"]["doc_id"]]
        print(f'  {c["extras"]["kind"]:8} "{c["cited_text"]}"  <- {doc.metadata["source"]} '
              f'chars {doc.metadata["start_index"] + c["extras"]["src_start"]}-'
              f'{doc.metadata["start_index"] + c["extras"]["src_end"]}')


if __name__ == "__main__":
    main()
