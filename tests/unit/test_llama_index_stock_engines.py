"""LlamaIndex's own engines with ``NestLLM`` (tiny random Llama, exact answers): the chat
engines of ``index.as_chat_engine`` (default, ``context``, ``condense_plus_context``),
``response_mode="refine"`` / ``"tree_summarize"`` and ``CitationQueryEngine`` decode over the
nodes the engine synthesizes over and return the spans; the citation rule in the assembler.

The expected answer is always :class:`NestQueryEngine`'s over the same nodes and question:
what the stock engine shows its LLM is then exactly what Nest decodes over.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import VectorStoreIndex
from llama_index.core.base.llms.generic_utils import messages_to_history_str
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONDENSE_PROMPT_TEMPLATE
from llama_index.core.chat_engine.condense_question import DEFAULT_PROMPT
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.query_engine import CitationQueryEngine
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from test_llama_index_engine import COPY_HEAVY, QUESTION, ListRetriever, corpus_nodes

from nest_core.types import NestChunk, Passage, Span
from nest_integrations.llama_index import NestLLM, NestQueryEngine, nodes_to_passages
from nest_integrations.llama_index.citations import SpanAssembler
from nest_integrations.llama_index.stock_prompt import parse_condense_prompt

MAX_NEW = 24


@pytest.fixture
def index():
    """The tiny corpus as a reader would load it: no title, a file name and path."""
    nodes = [TextNode(id_=f"node-{i}", text=s.node.text,
                      metadata={"file_name": f"doc{i}.md", "file_path": f"/data/doc{i}.md"})
             for i, s in enumerate(corpus_nodes())]
    return VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))


@pytest.fixture
def llm(tiny_lm):
    return NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)


def expected_for(tiny_lm, source_nodes, question=QUESTION, markers=False):
    eng = NestQueryEngine(retriever=ListRetriever([]), lm=tiny_lm, max_new_tokens=MAX_NEW,
                          config=COPY_HEAVY, citation_markers=markers)
    return eng.synthesize(QueryBundle(question), list(source_nodes))


def cited_rows(text, metadata, source_nodes):
    """(file label, cited text) per span; each span is checked against both texts."""
    rows = []
    for s in metadata["nest_spans"] + metadata["nest_matches"]:
        node = source_nodes[s["source_index"] - 1].node
        assert node.node_id == s["node_id"]
        assert node.get_content()[s["src_start"]:s["src_end"]] == s["cited_text"]
        assert text[s["out_start"]:s["out_end"]] == s["cited_text"]
        rows.append((s["title"], s["cited_text"]))
    return rows


# --- chat engines ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [None, "context", "condense_plus_context",
                                  "condense_question"])
def test_as_chat_engine_answers_over_its_context_with_spans(index, llm, tiny_lm, mode):
    kwargs = {"chat_mode": mode} if mode else {}
    chat = index.as_chat_engine(llm=llm, similarity_top_k=6, **kwargs)
    res = chat.chat(QUESTION)
    assert len(res.source_nodes) == 6
    expected = expected_for(tiny_lm, res.source_nodes)
    assert res.response == expected.response == " Ostrava. Pack my box with five dozen liquor jugs"
    assert res.metadata["nest_spans"] == expected.metadata["nest_spans"]
    assert cited_rows(res.response, res.metadata, res.source_nodes) == [
        ("doc0.md", "Ostrava."), ("doc3.md", "Pack my box with five dozen liquor jugs")]


def test_condense_plus_context_follow_up_uses_the_standalone_question(index, llm, tiny_lm):
    retriever = index.as_retriever(similarity_top_k=6)
    asked = []
    real_retrieve = retriever._retrieve

    def logged(bundle):
        asked.append(bundle.query_str)
        return real_retrieve(bundle)

    retriever._retrieve = logged
    from llama_index.core.chat_engine import CondensePlusContextChatEngine

    chat = CondensePlusContextChatEngine.from_defaults(retriever=retriever, llm=llm)
    chat.chat("Who founded the Zephyr Widget Company?")
    res = chat.chat("And where is it located?")
    standalone = "Where is Zephyr Widget Company located?"
    assert asked[-1] == standalone  # condensed by the rule, not by the 135M model
    expected = expected_for(tiny_lm, res.source_nodes, standalone)
    assert res.response == expected.response
    assert res.metadata["nest_spans"] == expected.metadata["nest_spans"]


def test_simple_chat_engine_warns_once_and_names_the_fix(index, llm, caplog):
    chat = index.as_chat_engine(llm=llm, chat_mode="simple")
    with caplog.at_level(logging.WARNING):
        chat.chat(QUESTION)
        chat.chat(QUESTION)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.name.endswith(".llm")]
    assert len(warnings) == 1
    assert "NestQueryEngine.from_index(index)" in warnings[0]


# --- refine, tree_summarize -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["refine", "tree_summarize"])
def test_response_modes_answer_once_over_all_nodes(index, llm, tiny_lm, mode):
    """Refine shows one node per LLM call; the answer is the one over all of them (it cites
    node 3 though node 0 is shown alone first), the same in every call of the synthesis."""
    res = index.as_query_engine(llm=llm, response_mode=mode, similarity_top_k=6).query(
        QUESTION)
    expected = expected_for(tiny_lm, res.source_nodes)
    assert res.response == expected.response
    assert res.metadata["nest_spans"] == expected.metadata["nest_spans"]
    assert ("doc3.md", "Pack my box with five dozen liquor jugs") in cited_rows(
        res.response, res.metadata, res.source_nodes)


def test_refine_decodes_once_per_synthesis(index, tiny_lm, monkeypatch):
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)
    decoder = llm._decoder.get()
    questions = []
    stream = decoder.stream

    def counted(prompt, *args, **kwargs):
        questions.append(prompt)
        return stream(prompt, *args, **kwargs)

    monkeypatch.setattr(decoder, "stream", counted)
    res = index.as_query_engine(llm=llm, response_mode="refine", similarity_top_k=6).query(
        QUESTION)
    assert questions == [QUESTION]  # one LLM call per node, one decoding
    assert res.metadata["nest_spans"]


# --- CitationQueryEngine --------------------------------------------------------------------
def test_citation_query_engine_gets_numbered_markers_and_spans(index, llm, tiny_lm):
    engine = CitationQueryEngine.from_args(index, llm=llm, similarity_top_k=6)
    res = engine.query(QUESTION)
    texts = [n.node.get_content() for n in res.source_nodes]
    assert all(t.startswith(f"Source {i}:\n") for i, t in enumerate(texts, start=1))
    expected = expected_for(tiny_lm, res.source_nodes, markers=True)
    assert res.response == expected.response
    # the numbered nodes' text differs from the plain nodes', and so does the answer
    assert res.response == " Ostrava. [1]\n 東京, emoji [6] 🙂 and the end. [6]\n"
    assert cited_rows(res.response, res.metadata, res.source_nodes) == [
        ("doc0.md", "Ostrava."), ("doc5.md", "東京, emoji"), ("doc5.md", "🙂 and the end.")]


# --- labels -----------------------------------------------------------------------------------
def test_nodes_are_labelled_by_file_name_then_file_path():
    nodes = [NodeWithScore(node=TextNode(id_=i, text="Some text.", metadata=m))
             for i, m in [("a", {"title": "Handbook", "file_name": "a.md"}),
                          ("b", {"file_name": "02-offices.md", "file_path": "/x/y.md"}),
                          ("c", {"file_path": "/data/handbook/03-leave.md"}),
                          ("d", {"file_name": ""})]]
    passages, _ = nodes_to_passages(nodes)
    assert [p.title for p in passages] == ["Handbook", "02-offices.md", "03-leave.md", None]


# --- condense prompts -------------------------------------------------------------------------
@pytest.mark.parametrize("template", [DEFAULT_CONDENSE_PROMPT_TEMPLATE, DEFAULT_PROMPT.template])
def test_condense_prompts_are_read_back(template):
    history = [ChatMessage(role=MessageRole.USER, content="Who founded Zephyr?"),
               ChatMessage(role=MessageRole.ASSISTANT, content="Marta.\nIn 1987.")]
    prompt = template.format(chat_history=messages_to_history_str(history),
                             question="And where is it?")
    parsed = parse_condense_prompt(prompt)
    assert parsed.message == "And where is it?"
    assert [(m.role, m.content) for m in parsed.history] == [
        (MessageRole.USER, "Who founded Zephyr?"), (MessageRole.ASSISTANT, "Marta.\nIn 1987.")]
    assert parse_condense_prompt("Query: where?\nAnswer: ") is None


# --- the citation rule in the assembler -------------------------------------------------------
PASSAGE = Passage(id="p", text="The Ghent office opened in 2019. Siduction ships 7 releases.")


def _copied(out: str, at: int, text: str, token: int) -> NestChunk:
    """A chunk of ``text`` copied from PASSAGE (one token), placed at ``out[at:]``."""
    src = PASSAGE.text.index(text)
    span = Span(text=text, out_start=at, out_end=at + len(text), passage=PASSAGE,
                src_start=src, src_end=src + len(text), token_start=token,
                token_end=token + 1)
    return NestChunk(text=out, token_ids=[token], span=span)


def _assemble(chunks: list[NestChunk]) -> tuple[str, list[dict]]:
    node = NodeWithScore(node=TextNode(id_="p", text=PASSAGE.text), score=1.0)
    spans: list[dict] = []
    assembler = SpanAssembler({"p": (1, node)}, spans, citation_markers=True)
    text = "".join(assembler.feed(c) for c in chunks) + assembler.finish()
    return text, spans


def test_assembler_marks_no_function_word_punctuation_digit_or_fragment():
    lm = NestChunk  # a generated piece: no span
    chunks = [lm("It", [0]),
              _copied(" opened in 2019", 3, "opened in 2019", 1),  # content: cited
              lm(",", [2]),
              _copied(" in", 19, "in", 3),          # a lone function word
              lm(" a", [4]),
              _copied(".", 23, ".", 5),             # a punctuation mark
              lm(" only", [6]),
              _copied(" 7", 30, "7", 7),            # a single digit
              lm(" of", [8]),
              _copied(" Sid", 35, "Sid", 9),        # the start of "Sideways"
              lm("eways", [10])]
    text, spans = _assemble(chunks)
    assert text == "It opened in 2019 [1], in a. only 7 of Sideways"
    assert [(s["cited_text"], s["out_start"], s["out_end"]) for s in spans] == [
        ("opened in 2019", 3, 17)]


def test_assembler_keeps_a_whole_word_copied_after_a_function_word():
    chunks = [NestChunk("Team", [0]), _copied(" Siduction", 5, "Siduction", 1),
              NestChunk(" ships.", [2])]
    text, spans = _assemble(chunks)
    assert text == "Team Siduction [1] ships."
    assert [s["cited_text"] for s in spans] == ["Siduction"]
