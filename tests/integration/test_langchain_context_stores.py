"""LangChain's stock RAG code with ChatNest as the model, on the real SmolLM2 and a Chroma store
on disk (the embedded handbook, examples/data): the context goes where the stock code puts it
(``create_stuff_documents_chain``'s system message, a ``@dynamic_prompt`` agent's system
prompt, Anthropic-style document blocks), and the answer must be right and cited to the file
that holds it, or come with one warning that names the fix."""

from __future__ import annotations

import base64
import warnings
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.outputs import LLMResult
from langchain_core.prompts import ChatPromptTemplate

from nest_integrations.langchain import ChatNest, NestMiniLMEmbeddings, documents_to_blocks
from nest_integrations.langchain.context import PASTED_KEY

pytestmark = pytest.mark.integration

DATA = Path(__file__).parents[2] / "examples" / "data"
# (question, a word of the right answer, the file that holds it): the demo's questions
HQ = ("Where is the headquarters of Halvorsen Orchard Robotics?", "Dunmore", "02-offices.md")
LEAVE = ("What is the paid leave allowance?", "27", "05-time-off.md")
# The system prompt of LangChain's create_stuff_documents_chain / create_retrieval_chain docs.
STUFF_SYSTEM = (
    "You are an assistant for question-answering tasks. Use the following pieces of "
    "retrieved context to answer the question. If you don't know the answer, say that you "
    "don't know. Use three sentences maximum and keep the answer concise.\n\n{context}")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The handbook split the way the LangChain tutorials split it, persisted by
    langchain_chroma and reopened from disk."""
    from langchain_chroma import Chroma
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    docs = [Document(page_content=p.read_text(encoding="utf-8"), metadata={"source": p.name})
            for p in sorted(DATA.glob("*.md"))]
    splitter = RecursiveCharacterTextSplitter(chunk_size=400, chunk_overlap=0,
                                              add_start_index=True)
    path = tmp_path_factory.mktemp("handbook-context")
    embeddings = NestMiniLMEmbeddings()
    Chroma.from_documents(splitter.split_documents(docs), embeddings, persist_directory=str(path))
    return Chroma(embedding_function=embeddings, persist_directory=str(path))


class LastMessage(BaseCallbackHandler):
    """The chat model's AIMessage, which create_stuff_documents_chain's StrOutputParser
    turns into a bare string (a standard LangChain callback)."""

    def __init__(self) -> None:
        self.message: AIMessage | None = None

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.message = response.generations[0][0].message  # type: ignore[attr-defined]


def cited_files(message: AIMessage, answer: str) -> set[str]:
    """The titles or sources of the documents whose citations hold ``answer``, each citation
    checked exactly against its document and against the citation rule."""
    block = message.content[0]
    text = block["text"]
    sources = {d.id: d for d in message.response_metadata["source_documents"]}
    files = set()
    for c in block.get("annotations", []):
        doc = sources[c["extras"]["doc_id"]]
        assert text[c["start_index"]:c["end_index"]] == c["cited_text"] == \
            doc.page_content[c["extras"]["src_start"]:c["extras"]["src_end"]]
        assert len("".join(c["cited_text"].split())) >= 3
        if answer in c["cited_text"]:
            files.add(str(doc.metadata.get("source") or doc.metadata.get("title")))
    return files


def test_create_stuff_documents_chain_with_a_retriever_cites_the_file(store: Any) -> None:
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    retriever = store.as_retriever(search_kwargs={"k": 4})
    prompt = ChatPromptTemplate.from_messages([("system", STUFF_SYSTEM), ("human", "{input}")])
    chat = ChatNest(retriever=retriever, max_tokens=48)
    rag_chain = create_retrieval_chain(retriever, create_stuff_documents_chain(chat, prompt))
    for question, answer, gold in (HQ, LEAVE):
        seen = LastMessage()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the documents have names: nothing to warn about
            out = rag_chain.invoke({"input": question}, config={"callbacks": [seen]})
        assert answer in out["answer"]
        assert seen.message is not None
        assert seen.message.text == out["answer"]
        assert gold in cited_files(seen.message, answer)


def test_create_stuff_documents_chain_alone_cites_the_pasted_context_and_warns(
        store: Any) -> None:
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    question, answer, _gold = HQ
    prompt = ChatPromptTemplate.from_messages([("system", STUFF_SYSTEM), ("human", "{input}")])
    chain = create_stuff_documents_chain(ChatNest(max_tokens=48), prompt)
    docs = store.similarity_search(question, k=4)
    seen = LastMessage()
    with pytest.warns(UserWarning, match=r"retriever=.*documents_to_blocks") as caught:
        text = chain.invoke({"input": question, "context": docs}, config={"callbacks": [seen]})
    assert len(caught) == 1
    assert answer in text
    assert seen.message is not None
    cited = [c for c in seen.message.content[0].get("annotations", [])
             if answer in c["cited_text"]]
    assert cited, "the answer is cited to the pasted passage that holds it"
    sources = {d.id: d for d in seen.message.response_metadata["source_documents"]}
    for c in cited:
        doc = sources[c["extras"]["doc_id"]]
        assert doc.metadata[PASTED_KEY] == "system"
        assert any(doc.page_content in d.page_content for d in docs)


def test_dynamic_prompt_rag_agent_with_chatnest_as_its_model(store: Any) -> None:
    """The LangChain v1 docs' RAG agent: ``@dynamic_prompt`` middleware puts the retrieved
    documents in the system prompt, ``create_agent`` with no tools (so no ``bind_tools``)."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRequest, dynamic_prompt

    @dynamic_prompt
    def prompt_with_context(request: ModelRequest) -> str:
        last_query = request.state["messages"][-1].text
        retrieved_docs = store.similarity_search(last_query)
        docs_content = "\n\n".join(doc.page_content for doc in retrieved_docs)
        return ("You are a helpful assistant. Use the following context in your response:"
                f"\n\n{docs_content}")

    question, answer, gold = HQ
    # the documented fix for names: the model searches the same store with the question
    agent = create_agent(ChatNest(vectorstore=store, k=4, max_tokens=48), tools=[],
                         middleware=[prompt_with_context])
    final = agent.invoke({"messages": [HumanMessage(question)]})["messages"][-1]
    assert answer in final.text
    assert gold in cited_files(final, answer)
    # without a store of its own it copies from the system prompt, and says how to cite files
    bare = create_agent(ChatNest(max_tokens=48), tools=[], middleware=[prompt_with_context])
    with pytest.warns(UserWarning, match="retriever=") as caught:
        final = bare.invoke({"messages": [HumanMessage(question)]})["messages"][-1]
    assert len(caught) == 1
    assert answer in final.text
    assert any(answer in c["cited_text"] for c in final.content[0].get("annotations", []))


@pytest.mark.parametrize("shape", ["anthropic", "documents_to_blocks", "file"])
def test_document_blocks_are_cited_by_file(shape: str) -> None:
    question, answer, gold = LEAVE
    files = sorted(DATA.glob("*.md"))
    if shape == "anthropic":  # Anthropic's documented block for citable plain text
        blocks: list[dict[str, Any]] = [
            {"type": "document",
             "source": {"type": "text", "media_type": "text/plain",
                        "data": p.read_text(encoding="utf-8")},
             "title": p.name, "citations": {"enabled": True}} for p in files]
    elif shape == "file":  # LangChain's standard file block, base64 of a text/plain file
        blocks = [{"type": "file", "mime_type": "text/plain", "extras": {"title": p.name},
                   "base64": base64.b64encode(p.read_bytes()).decode()} for p in files]
    else:
        blocks = documents_to_blocks(
            Document(page_content=p.read_text(encoding="utf-8"), metadata={"source": p.name})
            for p in files)
    chat = ChatNest(max_tokens=48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = chat.invoke([HumanMessage(content=[*blocks,
                                                     {"type": "text", "text": question}])])
    assert answer in message.text
    assert gold in cited_files(message, answer)
    names = {p.name for p in files}
    for c in message.content[0]["annotations"]:
        assert c.get("title") in names or c.get("url") in names
