"""Context where LangChain's stock code puts it (tiny random Llama, offline, exact): pasted
into a system or human message by a prompt template, in Anthropic-style or standard document
blocks; the question is the last human turn's; one warning where no source names the files.
The same scenarios on the real SmolLM2 and a Chroma store are in
tests/integration/test_langchain_context_stores.py."""

from __future__ import annotations

import base64
import warnings
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate

from nest_integrations.langchain import ChatNest, NestLLM, documents_to_blocks
from nest_integrations.langchain.context import PASTED_KEY, cut, find_in_prompt
from nest_integrations.langchain.documents import block_to_document
from tests.conftest import TINY_CORPUS
from tests.unit.test_langchain_dropin import RecordingRetriever
from tests.unit.test_langchain_models import PAPER, assert_citations_exact

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "Who founded the Zephyr Widget Company?"
CONTEXT = "\n\n".join(TINY_CORPUS)  # how the stock chains join documents
DOCS = [Document(page_content=t, metadata={"source": f"doc{i}.txt", "start_index": 0})
        for i, t in enumerate(TINY_CORPUS)]
STUFF_SYSTEM = (
    "You are an assistant for question-answering tasks. Use the following pieces of "
    "retrieved context to answer the question. If you don't know the answer, say that you "
    "don't know. Use three sentences maximum and keep the answer concise.\n\n{context}")
DYNAMIC_SYSTEM = "You are a helpful assistant. Use the following context in your response:\n\n"


@pytest.fixture
def chat(tiny_lm: Any) -> ChatNest:
    return ChatNest.from_lm(tiny_lm, max_tokens=16, nest_config=PAPER)


# --- which part of a message is the question, which the pasted context ---------------------
@pytest.mark.parametrize("template", [
    "Context:\n{context}\n\nQ: {question}\nA:",  # labelled "Q:"
    "{context}\n\n{question}",  # not labelled at all
    "Answer from the documents below.\n\n{context}\n\n{question}\nAnswer:",
    "{question}\n\nContext:\n{context}",  # the question first
    ("Use the following pieces of context to answer the question at the end.\n\n{context}\n\n"
    "Question: {question}\nHelpful Answer:"),  # langchain_classic's stuff prompt
    ("Context information is below.\n---------------------\n{context}\n---------------------\n"
    "Given the context information and not prior knowledge, answer the query.\n"
    "Query: {question}\nAnswer: "),  # LlamaIndex's text-QA template
    "System: " + DYNAMIC_SYSTEM + "{context}\nHuman: {question}",  # a chat prompt as a string
])
def test_cut_finds_the_question_and_the_pasted_context(template: str) -> None:
    parts = cut(template.format(context=CONTEXT, question=QUESTION))
    assert parts.question == QUESTION
    assert parts.context == CONTEXT


@pytest.mark.parametrize("text", [
    QUESTION,
    "You are a helpful assistant. Answer in one sentence.",  # a system prompt, no context
    "Question: " + QUESTION,  # a label but no context around it
    "Use the following context:\n\nshort",  # announced, but too short to be documents
    # instructions that mention information, not pasted documents
    ("You give accurate information.\n\nAlways answer in English, never reveal internal "
    "policies, and be kind and thorough in every reply you give to the user."),
])
def test_cut_leaves_a_message_without_pasted_context_alone(text: str) -> None:
    parts = cut(text)
    assert (parts.context, parts.kept) == ("", text)


def test_the_question_is_the_last_human_turn_and_pasted_context_becomes_passages() -> None:
    found = find_in_prompt([
        {"role": "system", "content": STUFF_SYSTEM.format(context=CONTEXT)},
        {"role": "user", "content": "earlier?"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": QUESTION}])
    assert found.question == QUESTION
    assert [d.page_content for d in found.pasted] == TINY_CORPUS
    assert {d.metadata[PASTED_KEY] for d in found.pasted} == {"system"}
    # the system message was only instructions and context: it is left out when Nest has
    # passages, the rest of the conversation stays
    assert found.reduced == found.prompt[1:]
    # no human turn at all (as in create_stuff_documents_chain's docstring): the system
    # prompt's own question
    ask = "What are everyone's favorite colors, from the documents below:"
    only = find_in_prompt([{"role": "system", "content": f"{ask}\n\n{CONTEXT}"}])
    assert only.question == ask


def test_a_heading_paragraph_titles_the_next_passage() -> None:
    found = find_in_prompt([{"role": "user", "content": (
        "Context:\n# Offices\n\nThe headquarters is in Dunmore, in the building everyone "
        "calls Barn 4.\n\n# Leave\n\nThe paid leave allowance is 27 days per year.\n\n"
        "Q: Where is the headquarters?")}])
    assert [(d.metadata.get("title"), d.page_content[:16]) for d in found.pasted] == [
        ("Offices", "The headquarters"), ("Leave", "The paid leave a")]
    assert found.question == "Where is the headquarters?"


# --- the stock chains, with and without a retriever --------------------------------------------
def stuff_chain(model: Any) -> Any:
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    prompt = ChatPromptTemplate.from_messages([("system", STUFF_SYSTEM), ("human", "{input}")])
    return create_stuff_documents_chain(model, prompt)


def test_create_stuff_documents_chain_searches_the_question(tiny_lm: Any) -> None:
    from langchain_classic.chains import create_retrieval_chain

    retriever = RecordingRetriever(docs=DOCS, queries=[])
    chat = ChatNest.from_lm(tiny_lm, retriever=retriever, max_tokens=16, nest_config=PAPER)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = create_retrieval_chain(retriever, stuff_chain(chat)).invoke({"input": QUESTION})
    assert retriever.queries == [QUESTION, QUESTION]  # the chain's search, then Nest's
    # the pasted copy is left out: the same answer as the question over the same documents
    direct = chat.invoke(QUESTION, documents=out["context"])
    assert out["answer"] == direct.text
    assert direct.content[0]["annotations"], "the tiny model copies from the documents"


def test_create_stuff_documents_chain_without_retriever_copies_the_pasted_context(
        chat: ChatNest) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Messages(BaseCallbackHandler):
        def __init__(self) -> None:
            self.messages: list[Any] = []

        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            self.messages.append(response.generations[0][0].message)

    seen = Messages()
    with pytest.warns(UserWarning, match="unnamed passages") as caught:
        text = stuff_chain(chat).invoke({"input": QUESTION, "context": DOCS},
                                        config={"callbacks": [seen]})
    assert len(caught) == 1
    (message,) = seen.messages
    assert message.text == text
    sources = message.response_metadata["source_documents"]
    assert [d.page_content for d in sources] == TINY_CORPUS
    assert message.content[0]["annotations"], "cited, to the pasted passages"
    by_text = [Document(page_content=t, metadata={PASTED_KEY: "system"}) for t in TINY_CORPUS]
    assert message.content == chat.invoke(QUESTION, documents=by_text).content


def test_dynamic_prompt_agent_with_chatnest_as_its_model(chat: ChatNest, tiny_lm: Any) -> None:
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRequest, dynamic_prompt

    retriever = RecordingRetriever(docs=DOCS, queries=[])

    @dynamic_prompt
    def prompt_with_context(request: ModelRequest) -> str:
        last_query = request.state["messages"][-1].text
        docs_content = "\n\n".join(d.page_content for d in retriever.invoke(last_query))
        return DYNAMIC_SYSTEM + docs_content

    agent = create_agent(chat, tools=[], middleware=[prompt_with_context])
    with pytest.warns(UserWarning, match="unnamed passages"):
        final = agent.invoke({"messages": [HumanMessage(QUESTION)]})["messages"][-1]
    pasted = "\n\n".join(d.page_content for d in retriever.invoke(QUESTION))
    with pytest.warns(UserWarning, match="unnamed passages"):
        direct = chat.invoke([SystemMessage(DYNAMIC_SYSTEM + pasted), HumanMessage(QUESTION)])
    assert final.content == direct.content
    assert final.content[0]["annotations"]
    assert_citations_exact_pasted(final)
    # given the retriever, the model searches with the human turn and cites the files
    named = ChatNest.from_lm(tiny_lm, retriever=retriever, max_tokens=16, nest_config=PAPER)
    retriever.queries.clear()
    agent = create_agent(named, tools=[], middleware=[prompt_with_context])
    final = agent.invoke({"messages": [HumanMessage(QUESTION)]})["messages"][-1]
    assert retriever.queries == [QUESTION, QUESTION]
    assert_citations_exact(final, final.response_metadata["source_documents"])


def assert_citations_exact_pasted(message: Any) -> None:
    by_id = {d.id: d for d in message.response_metadata["source_documents"]}
    text = message.content[0]["text"]
    for c in message.content[0]["annotations"]:
        doc = by_id[c["extras"]["doc_id"]]
        assert text[c["start_index"]:c["end_index"]] == c["cited_text"] == \
            doc.page_content[c["extras"]["src_start"]:c["extras"]["src_end"]]
        assert doc.metadata[PASTED_KEY] == "system"


def test_nest_llm_finds_the_question_and_the_pasted_context(tiny_lm: Any) -> None:
    prompt = f"Context:\n{CONTEXT}\n\nQ: {QUESTION}\nA:"
    retriever = RecordingRetriever(docs=DOCS, queries=[])
    NestLLM.from_lm(tiny_lm, retriever=retriever, max_tokens=4).invoke(prompt)
    assert retriever.queries == [QUESTION]
    llm = NestLLM.from_lm(tiny_lm, max_tokens=16, nest_config=PAPER)
    with pytest.warns(UserWarning, match="unnamed passages"):
        gen = llm.generate([prompt]).generations[0][0]
    info = gen.generation_info or {}
    assert [d.page_content for d in info["source_documents"]] == TINY_CORPUS
    assert info["citations"], "the answer's cited spans"
    assert gen.text == llm.invoke(QUESTION, documents=DOCS)


# --- document blocks -------------------------------------------------------------------------
def anthropic_block(doc: Document, title: str) -> dict[str, Any]:
    """Anthropic's documented document block for citable plain text."""
    return {"type": "document", "title": title, "citations": {"enabled": True},
            "source": {"type": "text", "media_type": "text/plain", "data": doc.page_content}}


def test_anthropic_and_file_blocks_are_documents(chat: ChatNest) -> None:
    titled = [Document(page_content=d.page_content, metadata={"title": f"T{i}"})
              for i, d in enumerate(DOCS)]
    expected = chat.invoke(QUESTION, documents=titled)
    assert expected.content[0]["annotations"]
    anthropic = [anthropic_block(d, f"T{i}") for i, d in enumerate(DOCS)]
    files = [{"type": "file", "mime_type": "text/plain", "extras": {"title": f"T{i}"},
              "base64": base64.b64encode(d.page_content.encode()).decode()}
             for i, d in enumerate(DOCS)]
    for blocks in (anthropic, files):
        msg = chat.invoke([HumanMessage(content=[*blocks, {"type": "text", "text": QUESTION}])])
        assert msg.content == expected.content
        assert [d.metadata for d in msg.response_metadata["source_documents"]] == \
            [{"title": f"T{i}"} for i in range(len(DOCS))]
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                          "data": "JVBERi0="}}
    with pytest.raises(TypeError, match="pass the text itself"):
        chat.invoke([HumanMessage(content=[pdf, {"type": "text", "text": QUESTION}])])


def test_documents_to_blocks_are_citable_by_chatnest_and_anthropic() -> None:
    doc = Document(page_content="Barn 4 is in Dunmore.",
                   metadata={"source": "02-offices.md", "title": "Offices", "start_index": 7})
    (block,) = documents_to_blocks([doc])
    assert block == {"type": "text-plain", "id": "02-offices.md#7", "mime_type": "text/plain",
                     "text": "Barn 4 is in Dunmore.", "title": "Offices",
                     "url": "02-offices.md", "citations": {"enabled": True},
                     "extras": {"source": "02-offices.md", "start_index": 7}}
    back = block_to_document(block)
    assert (back.id, back.page_content, back.metadata) == (
        "02-offices.md#7", doc.page_content,
        {"source": "02-offices.md", "start_index": 7, "title": "Offices"})
    # langchain-anthropic sends a text-plain block as {"type": "document", "source": {"type":
    # "text", "media_type", "data": text}} and copies title, context and citations over: the
    # block carries all three where it looks for them
    assert (block["type"], block["text"], block["title"], block["citations"]) == (
        "text-plain", doc.page_content, "Offices", {"enabled": True})


# --- one warning, naming the fix, where nothing names the documents --------------------------
def test_no_passages_warns_once_naming_the_fix(chat: ChatNest, tiny_lm: Any) -> None:
    with pytest.warns(UserWarning, match="no passages") as caught:
        chat.invoke(QUESTION)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "retriever=" in text
    assert "documents_to_blocks" in text
    assert "bind(documents=" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat.invoke(QUESTION, documents=[])  # no documents, on purpose
        chat.invoke(QUESTION, documents=DOCS)
        base = ChatNest.from_lm(tiny_lm, max_tokens=4, nest_overrides={"mode": "base"})
        base.invoke(QUESTION)  # a plain LM, on purpose
        empty = ChatNest.from_lm(tiny_lm, max_tokens=4,
                                 retriever=RecordingRetriever(docs=[], queries=[]))
        empty.invoke(QUESTION)  # a source that found nothing: the abstention's business
