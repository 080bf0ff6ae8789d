"""Drop-in scenarios on the real SmolLM2 over a Chroma store on disk, written the way LangChain
users write them: the handbook in examples/data split with
``RecursiveCharacterTextSplitter(add_start_index=True)``, persisted by ``langchain_chroma`` and
reopened from disk. Each answer must be right and cite the passage that holds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from nest_integrations.langchain import ChatNest, NestMiniLMEmbeddings, documents_to_blocks
from tests.unit.test_langchain_dropin import ScriptedToolCaller

pytestmark = pytest.mark.integration

DATA = Path(__file__).parents[2] / "examples" / "data"
QUESTION = "Where is the headquarters of Halvorsen Orchard Robotics?"
ANSWER = "Dunmore"
GOLD = "02-offices.md"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from langchain_chroma import Chroma
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    docs = [Document(page_content=p.read_text(encoding="utf-8"), metadata={"source": p.name})
            for p in sorted(DATA.glob("*.md"))]
    splitter = RecursiveCharacterTextSplitter(chunk_size=400, chunk_overlap=0,
                                              add_start_index=True)
    chunks = splitter.split_documents(docs)
    path = tmp_path_factory.mktemp("handbook")
    embeddings = NestMiniLMEmbeddings()
    Chroma.from_documents(chunks, embeddings, persist_directory=str(path))
    return Chroma(embedding_function=embeddings, persist_directory=str(path))  # reopened


def gold_citations(message: AIMessage) -> list[dict[str, Any]]:
    """Citations of the gold file whose cited text holds the answer (checked exactly)."""
    block = message.content[0]
    sources = {d.id: d for d in message.response_metadata["source_documents"]}
    found = []
    for c in block.get("annotations", []):
        doc = sources[c["extras"]["doc_id"]]
        assert block["text"][c["start_index"]:c["end_index"]] == c["cited_text"] == \
            doc.page_content[c["extras"]["src_start"]:c["extras"]["src_end"]]
        if doc.metadata["source"].endswith(GOLD) and ANSWER in c["cited_text"]:
            found.append(c)
    return found


def test_lcel_chain_with_documents_as_content_blocks(store: Any) -> None:
    retriever = store.as_retriever(search_kwargs={"k": 4})

    def as_messages(inputs: dict[str, Any]) -> list[HumanMessage]:
        blocks = documents_to_blocks(inputs["context"])
        return [HumanMessage(content=[*blocks, {"type": "text", "text": inputs["question"]}])]

    chain = ({"context": retriever, "question": RunnablePassthrough()}
             | RunnableLambda(as_messages) | ChatNest(max_tokens=48))
    message = chain.invoke(QUESTION)
    assert ANSWER in message.text
    assert gold_citations(message)
    streamed = None
    for chunk in chain.stream(QUESTION):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    assert streamed.content == message.content


def test_tutorial_chain_with_a_stuffed_prompt_and_a_retriever(store: Any) -> None:
    retriever = store.as_retriever(search_kwargs={"k": 4})
    prompt = ChatPromptTemplate.from_template(
        "Use the following pieces of retrieved context to answer the question.\n"
        "Question: {question}\nContext: {context}\nAnswer:")

    def format_docs(docs: list[Document]) -> str:
        return "\n\n".join(d.page_content for d in docs)

    chat = ChatNest(retriever=retriever, max_tokens=48)
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt
    message = (chain | chat).invoke(QUESTION)
    assert ANSWER in message.text
    assert gold_citations(message)
    assert ANSWER in (chain | chat | StrOutputParser()).invoke(QUESTION)


def test_langgraph_agent_final_state_holds_the_spans(store: Any) -> None:
    from langchain.agents import create_agent

    chat = ChatNest(vectorstore=store, k=4, max_tokens=48)
    agent = create_agent(ScriptedToolCaller(), [chat.as_tool(name="handbook")])
    state = agent.invoke({"messages": [HumanMessage(QUESTION)]})
    tool_message = next(m for m in state["messages"] if isinstance(m, ToolMessage))
    artifact = tool_message.artifact
    assert ANSWER in artifact["answer"]
    gold = [c for c in artifact["citations"] if ANSWER in c["cited_text"]]
    sources = {d.id: d for d in artifact["source_documents"]}
    assert any(sources[c["extras"]["doc_id"]].metadata["source"].endswith(GOLD) for c in gold)
    assert any(s["text"] == c["cited_text"] for c in gold
               for s in artifact["nest"]["spans"] + artifact["nest"]["matches"])
    assert ANSWER in state["messages"][-1].text
