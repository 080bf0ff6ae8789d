"""ChatNest / NestLLM / create_nest_chain end to end on the tiny random Llama (fast, offline).

The tiny model copies long spans from the passages, so citations, streaming merges, async
paths and chains are all exercised for real; the real SmolLM2 and real stores are in
tests/integration.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever

from nest_core.config import NestConfig
from nest_integrations.langchain import ChatNest, NestLLM, create_nest_chain
from tests.conftest import TINY_CORPUS

QUESTION = "Who founded the Zephyr Widget Company?"
DOCS = [Document(page_content=t, metadata={"source": f"doc{i}.txt", "start_index": 0})
        for i, t in enumerate(TINY_CORPUS)]


class KeywordRetriever(BaseRetriever):
    """Documents sharing a word with the query, most shared first (a tiny real retriever)."""

    docs: list[Document]
    k: int = 3

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        words = set(query.lower().split())
        scored = [(len(words & set(d.page_content.lower().split())), i, d)
                  for i, d in enumerate(self.docs)]
        return [d for n, _, d in sorted(scored, key=lambda t: (-t[0], t[1])) if n][: self.k]


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


# The paper's decoder. On the random tiny model the shipped defaults' LM judge rejects most
# drafts and the support rule drops the citations of what is left (a random answer is
# unsupported); the paper's mixture copies whole words, which the citation rule keeps.
PAPER = NestConfig()


@pytest.fixture
def chat(tiny_lm: Any) -> ChatNest:
    return ChatNest.from_lm(tiny_lm, max_tokens=16, nest_config=PAPER)


def assert_citations_exact(message: AIMessage, sources: list[Document]) -> None:
    """answer[start:end] == cited_text == the cited document's page_content slice."""
    by_id = {d.id: d for d in sources}
    (block,) = message.content
    answer = block["text"]
    assert answer == message.text
    for c in block["annotations"]:
        doc = by_id[c["extras"]["doc_id"]]
        src = doc.page_content[c["extras"]["src_start"]:c["extras"]["src_end"]]
        assert answer[c["start_index"]:c["end_index"]] == c["cited_text"] == src
        assert c["url"] == doc.metadata["source"]


def summed(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    return full


def test_invoke_cites_exact_source_slices(chat: ChatNest) -> None:
    msg = chat.invoke(QUESTION, documents=DOCS)
    sources = msg.response_metadata["source_documents"]
    assert [d.id for d in sources] == [f"doc{i}.txt#0" for i in range(len(DOCS))]
    assert msg.content[0]["annotations"], "the tiny model copies from the passages"
    assert_citations_exact(msg, sources)
    nest = msg.response_metadata["nest"]
    assert nest["stats"]["generated_tokens"] == msg.usage_metadata["output_tokens"] == 16
    assert nest["attribution_ratio"] == nest["stats"]["copied_tokens"] / 16
    kinds = [c["extras"]["kind"] for c in msg.content[0]["annotations"]]
    assert sorted(kinds) == sorted(["copied"] * len(nest["spans"])
                                   + ["matched"] * len(nest["matches"]))
    assert msg.response_metadata["model_name"] == "tiny-llama"
    assert msg.response_metadata["finish_reason"] == "length"


def test_stream_adds_up_to_invoke(chat: ChatNest) -> None:
    msg = chat.invoke(QUESTION, documents=DOCS)
    chunks = list(chat.stream(QUESTION, documents=DOCS))
    assert chunks[-1].chunk_position == "last"
    assert len(chunks) > 2, "the answer streams in pieces"
    full = summed(chunks)
    assert full.content == msg.content
    # the citations are the answer's cited spans, all in the last chunk
    assert not [a for c in chunks[:-1] for a in c.content[0].get("annotations", [])]
    cited = msg.response_metadata["nest"]["citations"]
    assert len(cited) >= 2, "the tiny model copies several whole-word spans"
    assert [(a["start_index"], a["end_index"], a["cited_text"])
            for a in msg.content[0]["annotations"]] == \
        [(s["out_start"], s["out_end"], s["text"]) for s in cited]
    assert full.usage_metadata == msg.usage_metadata
    assert full.response_metadata["nest"]["spans"] == msg.response_metadata["nest"]["spans"]
    assert full.response_metadata["source_documents"] == \
        msg.response_metadata["source_documents"]


async def test_async_paths_match_sync(chat: ChatNest) -> None:
    msg = chat.invoke(QUESTION, documents=DOCS)
    amsg = await chat.ainvoke(QUESTION, documents=DOCS)
    assert amsg.content == msg.content
    chunks = [c async for c in chat.astream(QUESTION, documents=DOCS)]
    assert summed(chunks).content == msg.content
    events = [e async for e in chat.astream_events(QUESTION, version="v2", documents=DOCS)]
    streamed = [e["data"]["chunk"] for e in events if e["event"] == "on_chat_model_stream"]
    assert summed(streamed).content == msg.content


def test_retriever_is_used_and_documents_override_it(tiny_lm: Any) -> None:
    retriever = KeywordRetriever(docs=DOCS, k=2)
    chat = ChatNest.from_lm(tiny_lm, retriever=retriever, max_tokens=8, nest_config=PAPER)
    msg = chat.invoke(QUESTION)
    expected = retriever.invoke(QUESTION)
    assert [d.page_content for d in msg.response_metadata["source_documents"]] == \
        [d.page_content for d in expected]
    assert_citations_exact(msg, msg.response_metadata["source_documents"])
    override = chat.invoke(QUESTION, documents=DOCS[3:4])
    assert [d.id for d in override.response_metadata["source_documents"]] == ["doc3.txt#0"]


def test_batch_equals_individual_invokes(chat: ChatNest) -> None:
    questions = [QUESTION, "What does a compiler do?"]
    batch = chat.batch(questions, documents=DOCS)
    assert [m.content for m in batch] == [chat.invoke(q, documents=DOCS).content
                                          for q in questions]


def test_lcel_prompt_model_parser(chat: ChatNest) -> None:
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = prompt | chat.bind(documents=DOCS) | StrOutputParser()
    assert chain.invoke({"question": QUESTION}) == chat.invoke(QUESTION, documents=DOCS).text


def test_nest_llm_generation_info_and_callbacks(tiny_lm: Any) -> None:
    llm = NestLLM.from_lm(tiny_lm, max_tokens=16)
    recorder = TokenRecorder()
    result = llm.generate([QUESTION], documents=DOCS, callbacks=[recorder])
    gen = result.generations[0][0]
    assert "".join(recorder.tokens) == gen.text
    assert len(recorder.tokens) >= 2  # text pieces, then the empty metadata chunk
    info = gen.generation_info
    by_id = {d.id: d for d in info["source_documents"]}
    assert info["spans"]
    for s in info["spans"]:
        src = by_id[s["passage_id"]].page_content[s["src_start"]:s["src_end"]]
        assert gen.text[s["out_start"]:s["out_end"]] == s["text"] == src
    assert info["usage"]["output_tokens"] == info["stats"]["generated_tokens"] == 16
    # Same prompt through the same chat template: the chat model says the same thing.
    assert gen.text == ChatNest.from_lm(tiny_lm, max_tokens=16).invoke(
        QUESTION, documents=DOCS).text
    assert "".join(llm.stream(QUESTION, documents=DOCS)) == gen.text


async def test_nest_llm_async(tiny_lm: Any) -> None:
    llm = NestLLM.from_lm(tiny_lm, max_tokens=8)
    text = llm.invoke(QUESTION, documents=DOCS)
    assert await llm.ainvoke(QUESTION, documents=DOCS) == text
    assert "".join([t async for t in llm.astream(QUESTION, documents=DOCS)]) == text


@pytest.mark.parametrize("use_async", [False, True])
async def test_create_nest_chain_streams_context_first(chat: ChatNest, use_async: bool) -> None:
    retriever = KeywordRetriever(docs=DOCS, k=2)
    chain = create_nest_chain(retriever, chat)
    inputs = {"input": QUESTION}
    if use_async:
        chunks = [c async for c in chain.astream(inputs)]
        out = await chain.ainvoke(inputs)
    else:
        chunks = list(chain.stream(inputs))
        out = chain.invoke(inputs)
    keys = [next(iter(c)) for c in chunks]
    assert keys[:2] == ["input", "context"]
    assert set(keys[2:]) == {"answer"}
    assert len(keys) > 3
    assert set(out) == {"input", "context", "answer"}
    assert out["context"] == retriever.invoke(QUESTION)
    expected = chat.invoke(QUESTION, documents=out["context"])
    assert out["answer"].content == expected.content
    assert summed([c["answer"] for c in chunks[2:]]).content == expected.content


def test_create_nest_chain_rejects_other_models() -> None:
    from langchain_core.language_models import GenericFakeChatModel

    with pytest.raises(TypeError, match="ChatNest or NestLLM"):
        create_nest_chain(KeywordRetriever(docs=DOCS), GenericFakeChatModel(messages=iter([])))
