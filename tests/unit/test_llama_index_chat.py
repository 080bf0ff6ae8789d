"""NestChatEngine on the tiny random Llama, and the deterministic condense rule."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.chat_engine.types import AgentChatResponse, StreamingAgentChatResponse
from llama_index.core.schema import QueryBundle
from test_llama_index_engine import COPY_HEAVY, ListRetriever, corpus_nodes

from nest_integrations.llama_index import NestChatEngine, NestQueryEngine
from nest_integrations.llama_index.condense import condense_question, subject_of

FIRST = "Who founded the Zephyr Widget Company?"
FOLLOW_UP = "And where is it located?"
STANDALONE = "Where is Zephyr Widget Company located?"


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.ASSISTANT, content=text)


class QueryLog(ListRetriever):
    """The fixed-node retriever, keeping every query string it was asked."""

    def __init__(self, nodes) -> None:
        super().__init__(nodes)
        self.queries: list[str] = []

    def _retrieve(self, query_bundle: QueryBundle):
        self.queries.append(query_bundle.query_str)
        return super()._retrieve(query_bundle)


@pytest.fixture
def retriever():
    return QueryLog(corpus_nodes())


@pytest.fixture
def chat(tiny_lm, retriever):
    return NestChatEngine.from_defaults(
        NestQueryEngine(retriever=retriever, lm=tiny_lm, max_new_tokens=16))


# --- the condense rule --------------------------------------------------------------------
@pytest.mark.parametrize(("history", "message", "expected"), [
    ([user(FIRST), assistant("Marta Quillfeather founded it.")], FOLLOW_UP, STANDALONE),
    ([user("Who founded Halvorsen Orchard Robotics?")], "and what is its headquarters?",
     "What is Halvorsen Orchard Robotics' headquarters?"),
    ([user("When did the Ghent office open?")], "How many staff does it have?",
     "How many staff does Ghent have?"),
    ([user(FIRST)], "Who runs the Brno plant?", "Who runs the Brno plant?"),  # no pronoun
    ([], FOLLOW_UP, FOLLOW_UP),  # nothing to refer to
    ([user("what is it about?"), assistant("about nothing")], FOLLOW_UP, FOLLOW_UP),
    ([user("what does the company make?"), assistant("Acme Corp makes clocks.")],
     "Where is it?", "Where is Acme Corp?"),  # the subject from the answer, as a fallback
])
def test_condense_question(history, message, expected):
    assert condense_question(history, message) == expected


def test_subject_is_the_longest_capitalised_run_without_question_words():
    assert subject_of("Who founded Halvorsen Orchard Robotics in Dunmore?") == \
        "Halvorsen Orchard Robotics"
    assert subject_of("What is it?") is None


# --- the chat engine ----------------------------------------------------------------------
def test_follow_up_is_condensed_answered_with_spans_and_remembered(retriever, tiny_lm):
    chat = NestChatEngine.from_defaults(NestQueryEngine(
        retriever=retriever, lm=tiny_lm, max_new_tokens=16, config=COPY_HEAVY))
    first = chat.chat(FIRST)
    second = chat.chat(FOLLOW_UP)
    assert retriever.queries == [FIRST, STANDALONE]
    assert isinstance(second, AgentChatResponse)
    # the answer is exactly the query engine's answer to the standalone question
    expected = NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                               max_new_tokens=16, config=COPY_HEAVY).query(STANDALONE)
    assert second.response == expected.response
    assert second.metadata["nest_spans"] == expected.metadata["nest_spans"]
    assert second.metadata["nest_spans"], "the tiny model copies runs of words here"
    for s in second.metadata["nest_spans"]:
        assert second.response[s["out_start"]:s["out_end"]] == s["cited_text"]
        assert second.source_nodes[s["source_index"] - 1].node.node_id == s["node_id"]
    assert second.sources[0].raw_input == {"query": STANDALONE}
    assert [n.node.node_id for n in second.source_nodes] == [f"node-{i}" for i in range(6)]
    assert [(m.role, m.content) for m in chat.chat_history] == [
        (MessageRole.USER, FIRST), (MessageRole.ASSISTANT, first.response),
        (MessageRole.USER, FOLLOW_UP), (MessageRole.ASSISTANT, second.response)]


def test_reset_forgets_the_conversation(chat, retriever):
    chat.chat(FIRST)
    chat.reset()
    assert chat.chat_history == []
    chat.chat(FOLLOW_UP)
    assert retriever.queries[-1] == FOLLOW_UP  # no subject left to resolve "it"


def test_explicit_chat_history_is_used_for_condensing(chat, retriever):
    chat.chat(FOLLOW_UP, chat_history=[user(FIRST), assistant("Someone.")])
    assert retriever.queries == [STANDALONE]


def test_stream_chat_equals_chat_and_writes_memory(tiny_lm):
    def make():
        return NestChatEngine.from_defaults(NestQueryEngine(
            retriever=ListRetriever(corpus_nodes()), lm=tiny_lm, max_new_tokens=16),
            chat_history=[user(FIRST), assistant("Someone.")])
    plain = make().chat(FOLLOW_UP)
    engine = make()
    streamed = engine.stream_chat(FOLLOW_UP)
    assert isinstance(streamed, StreamingAgentChatResponse)
    text = "".join(streamed.response_gen)
    assert text == plain.response
    raw = streamed.sources[0].raw_output
    assert raw.metadata["nest_spans"] == plain.metadata["nest_spans"]
    assert [m.content for m in engine.chat_history][-2:] == [FOLLOW_UP, text.strip()]


@pytest.mark.parametrize("stream", [False, True])
async def test_async_chat_agrees_with_sync(tiny_lm, stream):
    def make():
        return NestChatEngine.from_defaults(NestQueryEngine(
            retriever=ListRetriever(corpus_nodes()), lm=tiny_lm, max_new_tokens=16))
    sync_engine, async_engine = make(), make()
    sync_engine.chat(FIRST)
    expected = sync_engine.chat(FOLLOW_UP).response
    await async_engine.achat(FIRST)
    if stream:
        res = await async_engine.astream_chat(FOLLOW_UP)
        text = "".join([piece async for piece in res.async_response_gen()])
    else:
        text = (await async_engine.achat(FOLLOW_UP)).response
    assert text == expected
    assert len(async_engine.chat_history) == 4


def test_chat_emits_the_query_engines_events(tiny_lm):
    debug = LlamaDebugHandler(print_trace_on_end=False)
    engine = NestChatEngine.from_defaults(NestQueryEngine(
        retriever=ListRetriever(corpus_nodes()), lm=tiny_lm, max_new_tokens=8,
        callback_manager=CallbackManager([debug])))
    engine.chat(FIRST)
    for kind in (CBEventType.QUERY, CBEventType.RETRIEVE, CBEventType.SYNTHESIZE,
                 CBEventType.LLM):
        assert len(debug.get_event_pairs(kind)) == 1, kind


def test_wrong_engine_and_llm_rewrite_options_are_refused(tiny_lm):
    with pytest.raises(TypeError, match="CondenseQuestionChatEngine"):
        NestChatEngine.from_defaults(object())
    qe = NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm)
    with pytest.raises(ValueError, match=r"does not support llm=.*condense_question="):
        NestChatEngine.from_defaults(qe, llm=object())


def test_custom_condense_function(tiny_lm, retriever):
    engine = NestChatEngine.from_defaults(
        NestQueryEngine(retriever=retriever, lm=tiny_lm, max_new_tokens=4),
        condense_question=lambda history, message: f"{len(history)}: {message}")
    engine.chat("a")
    engine.chat("b")
    assert retriever.queries == ["0: a", "2: b"]
