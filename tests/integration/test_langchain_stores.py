"""ChatNest / NestLLM / create_nest_chain over real stores persisted to disk and reloaded.

Chroma through ``langchain-chroma`` and FAISS through ``langchain-community``, both built with
the bundled MiniLM embeddings in ``tmp_path``, then opened again from disk as a user would.
Every citation is checked exactly: ``answer[start:end] == cited_text ==`` the stored
document's ``page_content[src_start:src_end]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from nest_core.config import paper_config
from nest_integrations.langchain import (
    ChatNest,
    NestLLM,
    NestMiniLMEmbeddings,
    create_nest_chain,
)

pytestmark = pytest.mark.integration

QUESTION = "What is FOLDOC?"
TEXTS = [
    ("FOLDOC is the Free On-line Dictionary of Computing, a searchable dictionary of "
    "computing terms edited by Denis Howe since 1985."),
    ("A compiler translates source code into machine code before the program runs; an "
    "interpreter executes the source code directly."),
    ("The headquarters of Halvorsen Orchard Robotics is in Dunmore, Pennsylvania, in the "
    "building everyone calls Barn 4."),
    "The Wellington office in New Zealand opened in 2016 and is led by Mereana Toki.",
]
IDS = ["foldoc", "compiler", "barn4", "wellington"]
MAX_TOKENS = 16


def _docs() -> list[Document]:
    return [Document(page_content=t, metadata={"source": f"https://example.org/{i}",
                                               "title": i.capitalize()})
            for t, i in zip(TEXTS, IDS, strict=True)]


@pytest.fixture(scope="module")
def embeddings() -> NestMiniLMEmbeddings:
    return NestMiniLMEmbeddings()


@pytest.fixture(scope="module")
def chroma_dir(tmp_path_factory: pytest.TempPathFactory, embeddings: Any) -> Path:
    from langchain_chroma import Chroma

    path = tmp_path_factory.mktemp("chroma")
    Chroma.from_documents(_docs(), embeddings, ids=IDS, collection_name="handbook",
                          persist_directory=str(path))
    return path


@pytest.fixture(scope="module")
def chroma(chroma_dir: Path, embeddings: Any) -> Any:
    """The store reopened from disk, as a later process would."""
    from langchain_chroma import Chroma

    return Chroma(collection_name="handbook", embedding_function=embeddings,
                  persist_directory=str(chroma_dir))


@pytest.fixture(scope="module")
def faiss_store(tmp_path_factory: pytest.TempPathFactory, embeddings: Any) -> Any:
    from langchain_community.vectorstores import FAISS

    path = tmp_path_factory.mktemp("faiss")
    FAISS.from_documents(_docs(), embeddings, ids=IDS).save_local(str(path))
    # The user's own decision, for a file they wrote themselves: never made by nest.
    return FAISS.load_local(str(path), embeddings, allow_dangerous_deserialization=True)


def assert_citations_exact(message: AIMessage, store_docs: dict[str, str]) -> int:
    """Check every citation against the stored text; return how many there are."""
    (block,) = message.content
    for c in block["annotations"]:
        stored = store_docs[c["extras"]["doc_id"]]
        src = stored[c["extras"]["src_start"]:c["extras"]["src_end"]]
        assert block["text"][c["start_index"]:c["end_index"]] == c["cited_text"] == src
        assert c["url"] == f"https://example.org/{c['extras']['doc_id']}"
    return len(block["annotations"])


STORED = dict(zip(IDS, TEXTS, strict=True))


def test_chroma_reloaded_invoke_stream_and_scores(chroma: Any) -> None:
    # the paper's copy-only Nest: the shipped default lets the 135M LM judge, and reading
    # both passages it answers with the compiler sentence (its own in-context answer)
    chat = ChatNest(vectorstore=chroma, k=2, max_tokens=MAX_TOKENS, nest_config=paper_config())
    msg = chat.invoke(QUESTION)
    sources = msg.response_metadata["source_documents"]
    expected = chroma.similarity_search_with_score(QUESTION, k=2)
    assert [d.id for d in sources] == [d.id for d, _ in expected]
    assert sources[0].id == "foldoc"
    assert [d.metadata["nest_score"] for d in sources] == [s for _, s in expected]
    assert assert_citations_exact(msg, STORED) >= 1
    assert msg.text.startswith("FOLDOC")

    full = None
    for chunk in chat.stream(QUESTION):
        full = chunk if full is None else full + chunk
    assert full.content == msg.content
    assert full.usage_metadata == msg.usage_metadata


async def test_chroma_async_matches_sync(chroma: Any) -> None:
    chat = ChatNest(vectorstore=chroma, k=2, max_tokens=MAX_TOKENS)
    msg = await chat.ainvoke(QUESTION)
    assert msg.content == chat.invoke(QUESTION).content
    chunks = [c async for c in chat.astream(QUESTION)]
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert full.content == msg.content


def test_chroma_lcel_and_datastore(chroma: Any, tmp_path: Path) -> None:
    chat = ChatNest(vectorstore=chroma, k=2, max_tokens=MAX_TOKENS,
                    datastore_dir=str(tmp_path / "spans"))
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    text = (prompt | chat | StrOutputParser()).invoke({"question": QUESTION})
    assert text == ChatNest(vectorstore=chroma, k=2, max_tokens=MAX_TOKENS).invoke(
        QUESTION).text
    assert len(list((tmp_path / "spans").rglob("*.span"))) == 2  # one file per passage


def test_faiss_reloaded_retriever_and_chain(faiss_store: Any) -> None:
    retriever = faiss_store.as_retriever(search_kwargs={"k": 2})
    chat = ChatNest(retriever=retriever, max_tokens=MAX_TOKENS)
    msg = chat.invoke(QUESTION)
    assert [d.id for d in msg.response_metadata["source_documents"]] == \
        [d.id for d in retriever.invoke(QUESTION)]
    assert assert_citations_exact(msg, STORED) >= 1

    chain = create_nest_chain(retriever, ChatNest(max_tokens=MAX_TOKENS))
    chunks = list(chain.stream({"input": QUESTION}))
    assert [next(iter(c)) for c in chunks[:2]] == ["input", "context"]
    out = chunks[0]
    for c in chunks[1:]:
        out = out + c
    assert [d.id for d in out["context"]] == [d.id for d in retriever.invoke(QUESTION)]
    assert out["answer"].content == msg.content


def test_faiss_vectorstore_with_nest_llm(faiss_store: Any) -> None:
    llm = NestLLM(vectorstore=faiss_store, k=2, max_tokens=MAX_TOKENS)
    gen = llm.generate([QUESTION]).generations[0][0]
    info = gen.generation_info
    assert info["source_documents"][0].id == "foldoc"
    assert info["citations"]  # copied spans, or the focus sentence quoted (a matched span)
    for s in info["citations"]:
        src = STORED[s["passage_id"]][s["src_start"]:s["src_end"]]
        assert gen.text[s["out_start"]:s["out_end"]] == s["text"] == src
    assert "".join(llm.stream(QUESTION)) == gen.text


def test_chat_and_llm_abstain_where_the_store_does_not_answer(chroma: Any,
                                                              faiss_store: Any) -> None:
    # the shipped default, as ChatNest and NestLLM users get it: no made-up, cited answer
    off_topic = "What is the capital of France?"
    message = ChatNest(vectorstore=chroma, k=2, max_tokens=MAX_TOKENS).invoke(off_topic)
    (block,) = message.content
    assert block["text"] == "The documents do not say."
    assert not block.get("annotations")
    assert message.response_metadata["finish_reason"] == "abstained"
    out = NestLLM(vectorstore=faiss_store, k=2, max_tokens=MAX_TOKENS).generate([off_topic])
    generation = out.generations[0][0]
    assert generation.text == "The documents do not say."
    assert generation.generation_info["finish_reason"] == "abstained"
    assert generation.generation_info["spans"] == []
