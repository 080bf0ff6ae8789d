"""ChatNest where LangChain users already are (tiny random Llama, offline, exact): documents
as content blocks, stuffed RAG prompts, partner-package conventions, the agent tool inside a
real LangGraph loop. The same scenarios on the real SmolLM2 and a Chroma store on disk are in
tests/integration/test_langchain_dropin_stores.py."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.messages.content import create_plaintext_block
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from pydantic import ValidationError

from nest_core.prompts import find_question, stuffed_question
from nest_integrations.langchain import ChatNest, NestLLM, create_nest_tool, documents_to_blocks
from tests.conftest import TINY_CORPUS
from tests.unit.test_langchain_models import PAPER, assert_citations_exact

QUESTION = "Who founded the Zephyr Widget Company?"
DOCS = [Document(page_content=t, metadata={"source": f"doc{i}.txt", "start_index": 0})
        for i, t in enumerate(TINY_CORPUS)]
RAG_PROMPT = ChatPromptTemplate.from_template(
    "You are an assistant for question-answering tasks. Use the following pieces of "
    "retrieved context to answer the question.\nQuestion: {question}\nContext: {context}\n"
    "Answer:")


class RecordingRetriever(BaseRetriever):
    """Documents sharing a word with the query (a tiny real retriever) that records queries."""

    docs: list[Document]
    queries: list[str]

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        self.queries.append(query)
        words = set(query.lower().split())
        return [d for d in self.docs if words & set(d.page_content.lower().split())][:3]


class ScriptedToolCaller(BaseChatModel):
    """A tool-calling chat model with a script: call the first bound tool with the user's
    question, then answer with what the tool returned (the 135M model cannot call tools)."""

    tool_name: str = ""

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-caller"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.model_copy(update={"tool_name": tools[0].name})

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            reply = AIMessage(content=last.text)
        else:
            reply = AIMessage(content="", tool_calls=[
                {"name": self.tool_name, "args": {"query": last.text}, "id": "call-1"}])
        return ChatResult(generations=[ChatGeneration(message=reply)])


@pytest.fixture
def chat(tiny_lm: Any) -> ChatNest:
    return ChatNest.from_lm(tiny_lm, max_tokens=16, nest_config=PAPER)


# --- documents as content blocks -------------------------------------------------------------
def test_documents_in_content_blocks_are_decoded_over_and_cited(chat: ChatNest) -> None:
    message = HumanMessage(content=[*documents_to_blocks(DOCS),
                                    {"type": "text", "text": QUESTION}])
    msg = chat.invoke([message])
    assert msg.content[0]["annotations"], "the tiny model copies from the block documents"
    assert msg.content == chat.invoke(QUESTION, documents=DOCS).content
    sources = msg.response_metadata["source_documents"]
    assert [d.id for d in sources] == [f"doc{i}.txt#0" for i in range(len(DOCS))]
    assert_citations_exact(msg, sources)


def test_blocks_made_by_create_plaintext_block_get_stable_ids(chat: ChatNest) -> None:
    def ask() -> AIMessage:
        blocks = [create_plaintext_block(text=t, title=f"T{i}")
                  for i, t in enumerate(TINY_CORPUS)]
        return chat.invoke([HumanMessage(content=[*blocks, {"type": "text", "text": QUESTION}])])

    first, second = ask(), ask()  # each call invents new random block ids
    assert first.content == second.content
    ids = [d.id for d in first.response_metadata["source_documents"]]
    assert all(i.startswith("sha256:") for i in ids)
    assert {d.metadata["title"] for d in first.response_metadata["source_documents"]} == {
        f"T{i}" for i in range(len(TINY_CORPUS))}


def test_a_block_without_inline_text_is_refused(chat: ChatNest) -> None:
    block = create_plaintext_block(url="https://example.org/a.txt")
    with pytest.raises(TypeError, match="pass the text itself"):
        chat.invoke([HumanMessage(content=[block, {"type": "text", "text": QUESTION}])])


# --- stuffed prompts ---------------------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "question"), [
    (RAG_PROMPT.format(question=QUESTION, context=" ".join(TINY_CORPUS)), QUESTION),
    ("Context information is below.\n---------------------\n" + "\n".join(TINY_CORPUS)
     + "\n---------------------\nGiven the context information and not prior knowledge, "
     "answer the query.\nQuery: Where is Ostrava?\nAnswer: ", "Where is Ostrava?"),
    ("Documents:\n" + "\n".join(TINY_CORPUS) + "\n\nQuestion:\nWho founded it\nand when?\n\n"
     "Answer:", "Who founded it and when?"),
    (QUESTION, None),
    ("Question: " + QUESTION, None),  # a label but no context around it
])
def test_stuffed_question(prompt: str, question: str | None) -> None:
    assert stuffed_question(prompt) == question


def test_find_question_picks_the_message_then_the_labelled_question() -> None:
    stuffed = RAG_PROMPT.format(question=QUESTION, context=" ".join(TINY_CORPUS))
    found = find_question([{"role": "user", "content": "earlier?"},
                           {"role": "assistant", "content": "yes"},
                           {"role": "user", "content": stuffed},
                           {"role": "user", "content": "  "}])  # a blank message asks nothing
    assert (found.asked, found.stuffed, found.text) == (stuffed, QUESTION, QUESTION)
    assert find_question([{"role": "system", "content": "be brief"}]).text == ""
    assert find_question("Query: where?\nAnswer: ").stuffed is None  # no context around it
    assert find_question("Query: where?\nAnswer: ", min_context=0).text == "where?"


def test_a_retriever_in_a_stuffed_chain_searches_the_question(tiny_lm: Any) -> None:
    retriever = RecordingRetriever(docs=DOCS, queries=[])
    chat = ChatNest.from_lm(tiny_lm, retriever=retriever, max_tokens=16)
    chain = RAG_PROMPT | chat
    msg = chain.invoke({"question": QUESTION, "context": "\n\n".join(TINY_CORPUS[3:])})
    assert retriever.queries == [QUESTION]
    assert msg.response_metadata["source_documents"], "retrieved on the question"
    llm = NestLLM.from_lm(tiny_lm, retriever=retriever, max_tokens=8)
    (RAG_PROMPT | llm).invoke({"question": QUESTION, "context": TINY_CORPUS[3]})
    assert retriever.queries == [QUESTION, QUESTION]


def test_a_stuffed_prompt_with_passages_is_answered_as_its_question(tiny_lm: Any) -> None:
    stuffed = RAG_PROMPT.format_messages(question=QUESTION, context=" ".join(TINY_CORPUS))
    used = {}
    for mode in ("question", "keep"):
        chat = ChatNest.from_lm(tiny_lm, max_tokens=8, stuffed_prompts=mode)
        used[mode] = chat.invoke(stuffed, documents=DOCS).usage_metadata["input_tokens"]
    plain = ChatNest.from_lm(tiny_lm, max_tokens=8).invoke(QUESTION, documents=DOCS)
    assert used["question"] == plain.usage_metadata["input_tokens"] < used["keep"]


def test_a_stuffed_prompt_without_passages_copies_the_pasted_context_and_warns(
        chat: ChatNest) -> None:
    stuffed = RAG_PROMPT.format_messages(question=QUESTION, context="\n\n".join(TINY_CORPUS))
    with pytest.warns(UserWarning, match=r"unnamed passages.*retriever=") as caught:
        msg = chat.invoke(stuffed)
    assert len(caught) == 1
    assert [d.page_content for d in msg.response_metadata["source_documents"]] == TINY_CORPUS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chat.invoke(stuffed, documents=DOCS)  # passages given: nothing to change


# --- partner-package conventions -----------------------------------------------------------
def test_model_name_alias_and_unknown_arguments() -> None:
    assert ChatNest(model_name="some/model").model == "some/model"
    assert ChatNest(model="some/model").model == "some/model"
    with pytest.raises(ValidationError, match=r"unexpected argument\(s\) \['relaxation'\]"):
        ChatNest(relaxation=0.5)
    with pytest.warns(UserWarning, match="runs the model locally"):
        ChatNest(api_key="sk-none", timeout=10)
    for bad in ({"dtype": "bfloat16"}, {"trust_remote_code": True}):
        with pytest.raises(ValidationError, match="is not passed through"):
            ChatNest(model_kwargs=bad)


def test_model_kwargs_reach_from_pretrained(tiny_lm: Any, tmp_path: Any) -> None:
    # a copy: save_pretrained fills in the config (architectures, dtype), which would change
    # the session model's fingerprint under the other tests' feet
    copy.deepcopy(tiny_lm.model).save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    for impl in ("eager", "sdpa"):
        chat = ChatNest(model=str(tmp_path), model_kwargs={"attn_implementation": impl},
                        max_tokens=4)
        assert chat.invoke(QUESTION).text is not None
        assert chat._lm.model.config._attn_implementation == impl


def test_per_call_temperature_zero_is_accepted(chat: ChatNest) -> None:
    assert chat.invoke(QUESTION, temperature=0, documents=DOCS).content == \
        chat.invoke(QUESTION, documents=DOCS).content
    with pytest.raises(ValueError, match="decodes greedily"):
        chat.invoke(QUESTION, temperature=0.7)


def test_streaming_field_streams_inside_invoke(tiny_lm: Any) -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class ChunkRecorder(BaseCallbackHandler):
        def __init__(self) -> None:
            self.texts: list[str] = []

        def on_llm_new_token(self, token: Any, **kwargs: Any) -> None:
            self.texts.append(kwargs["chunk"].message.text)

    recorder = ChunkRecorder()
    chat = ChatNest.from_lm(tiny_lm, max_tokens=16, streaming=True)
    msg = chat.invoke(QUESTION, documents=DOCS, config={"callbacks": [recorder]})
    assert len(recorder.texts) > 1
    assert "".join(recorder.texts) == msg.text


def test_tools_and_structured_output_say_what_to_use(chat: ChatNest) -> None:
    with pytest.raises(NotImplementedError, match=r"as_tool\(\)"):
        chat.bind_tools([])
    with pytest.raises(NotImplementedError, match="StrOutputParser"):
        chat.with_structured_output(dict)


# --- the agent tool ------------------------------------------------------------------------
def test_tool_returns_cited_content_and_artifact(chat: ChatNest) -> None:
    tool = create_nest_tool(chat, RecordingRetriever(docs=DOCS, queries=[]))
    assert tool.args == {"query": {"description": tool.args["query"]["description"],
                                   "title": "Query", "type": "string"}}
    result = tool.invoke({"type": "tool_call", "name": tool.name, "id": "c1",
                          "args": {"query": QUESTION}})
    assert isinstance(result, ToolMessage)
    artifact = result.artifact
    assert artifact["citations"]
    assert artifact["nest"]["spans"]
    answer = artifact["answer"]
    for c in artifact["citations"]:
        doc = {d.id: d for d in artifact["source_documents"]}[c["extras"]["doc_id"]]
        assert answer[c["start_index"]:c["end_index"]] == c["cited_text"] == \
            doc.page_content[c["extras"]["src_start"]:c["extras"]["src_end"]]
    assert result.content.startswith(answer[:10])
    assert "\n[1] " in result.content  # the sources, numbered, for the agent model to read
    with pytest.raises(ValueError, match="nothing to answer from"):
        chat.as_tool()


def test_langgraph_agent_calls_the_tool_and_keeps_the_spans(tiny_lm: Any) -> None:
    from langchain.agents import create_agent

    chat = ChatNest.from_lm(tiny_lm, retriever=RecordingRetriever(docs=DOCS, queries=[]),
                            max_tokens=16)
    tool = chat.as_tool(name="handbook")
    agent = create_agent(ScriptedToolCaller(), [tool])
    state = agent.invoke({"messages": [HumanMessage(QUESTION)]})
    _human, call, tool_message, final = state["messages"]
    assert call.tool_calls[0]["name"] == "handbook"
    assert isinstance(tool_message, ToolMessage)
    assert tool_message.artifact["nest"]["spans"]
    assert final.text == tool_message.text


# --- a store built with another embedding model ----------------------------------------------
class Hashing(Embeddings):
    """A real (hashing) embedding model of a given dimension."""

    def __init__(self, dim: int) -> None:
        from nest_core.stores.embeddings import HashingEmbeddings

        self.embed = HashingEmbeddings(dim)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.embed([text])[0]


@pytest.mark.parametrize("kind", ["chroma", "faiss"])
def test_an_embedding_mismatch_names_the_cause(tiny_lm: Any, tmp_path: Any, kind: str) -> None:
    if kind == "chroma":
        from langchain_chroma import Chroma

        Chroma.from_documents(DOCS, Hashing(64), persist_directory=str(tmp_path))
        store: Any = Chroma(embedding_function=Hashing(32), persist_directory=str(tmp_path))
    else:
        from langchain_community.vectorstores import FAISS

        store = FAISS.from_documents(DOCS, Hashing(64))
        store.embedding_function = Hashing(32)
    chat = ChatNest.from_lm(tiny_lm, vectorstore=store, max_tokens=4)
    with pytest.raises(ValueError, match="built with another embedding model"):
        chat.invoke(QUESTION)
    retrieving = ChatNest.from_lm(tiny_lm, retriever=store.as_retriever(), max_tokens=4)
    with pytest.raises(ValueError, match="Open the store with the embedding model"):
        retrieving.invoke(QUESTION)
