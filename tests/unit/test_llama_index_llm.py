"""NestLLM inside LlamaIndex's own query engines (tiny random Llama, MockEmbedding index):
passages are the nodes the engine synthesizes over, spans reach ``Response.metadata``.
The decoder copies heavily (``COPY_HEAVY``) so that its spans are citations."""

from __future__ import annotations

import contextvars

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.postprocessor import SimilarityPostprocessor
from llama_index.core.prompts.default_prompts import (
    DEFAULT_REFINE_PROMPT,
    DEFAULT_TEXT_QA_PROMPT,
)
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from test_llama_index_engine import COPY_HEAVY, QUESTION, ListRetriever, corpus_nodes

from nest_integrations.llama_index import NestLLM, NestQueryEngine
from nest_integrations.llama_index.llm import retrieval_query
from nest_integrations.llama_index.stock_prompt import context_nodes, parse_stock_prompt

MAX_NEW = 24


@pytest.fixture
def index():
    nodes = [TextNode(id_=f"node-{i}", text=t.text, metadata={"title": f"T{i}", "n": i})
             for i, t in enumerate(n.node for n in corpus_nodes())]
    return VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))


@pytest.fixture
def nest_settings_llm(tiny_lm):
    """``Settings.llm = NestLLM(...)`` for one test, the previous value restored after."""
    before = Settings._llm
    Settings.llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)
    yield Settings.llm
    Settings._llm = before


def expected_for(tiny_lm, source_nodes):
    """What NestQueryEngine decodes over the same nodes, in the same order."""
    eng = NestQueryEngine(retriever=ListRetriever([]), lm=tiny_lm, max_new_tokens=MAX_NEW,
                          config=COPY_HEAVY)
    return eng.synthesize(QueryBundle(QUESTION), list(source_nodes))


def assert_cites_real_nodes(res):
    ids = [n.node.node_id for n in res.source_nodes]
    assert res.metadata["nest_spans"], "the tiny model copies from node-0 for QUESTION"
    for s in res.metadata["nest_spans"] + res.metadata["nest_matches"]:
        node = res.source_nodes[s["source_index"] - 1].node
        assert node.node_id == s["node_id"] in ids
        assert node.text[s["src_start"]:s["src_end"]] == s["cited_text"]
        assert str(res)[s["out_start"]:s["out_end"]] == s["cited_text"]


def test_settings_llm_in_as_query_engine_puts_spans_in_response_metadata(
        index, tiny_lm, nest_settings_llm):
    res = index.as_query_engine(similarity_top_k=4).query(QUESTION)
    expected = expected_for(tiny_lm, res.source_nodes)
    assert res.response == expected.response
    assert res.metadata["nest_spans"] == expected.metadata["nest_spans"]
    assert res.metadata["nest_matches"] == expected.metadata["nest_matches"]
    assert res.metadata["nest_stats"]["datastore_keys"] > 0
    for n in res.source_nodes:  # the stock per-node metadata is still there
        assert res.metadata[n.node.node_id]["title"] == n.node.metadata["title"]
    assert_cites_real_nodes(res)


def test_postprocessed_nodes_only_and_no_second_retrieval(index, tiny_lm):
    own = ListRetriever(corpus_nodes())
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY, retriever=own)
    # MockEmbedding scores every node 1.0; this postprocessor keeps only node-0
    keep_first = _KeepIds(ids={"node-0"})
    res = index.as_query_engine(llm=llm, similarity_top_k=6,
                                node_postprocessors=[keep_first]).query(QUESTION)
    assert own.calls == 0  # the prompt's context was used, the LLM's retriever never
    assert [n.node.node_id for n in res.source_nodes] == ["node-0"]
    expected = expected_for(tiny_lm, res.source_nodes)
    assert res.response == expected.response
    assert res.metadata["nest_spans"] == expected.metadata["nest_spans"]
    assert res.metadata["nest_matches"] == expected.metadata["nest_matches"]
    assert res.metadata["nest_stats"]["datastore_keys"] > 0


def test_streaming_stock_engine_fills_span_metadata_while_reading(index, tiny_lm):
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)
    plain = index.as_query_engine(llm=llm, similarity_top_k=4).query(QUESTION)
    res = index.as_query_engine(llm=llm, similarity_top_k=4, streaming=True).query(QUESTION)
    assert "nest_spans" not in res.metadata  # the stock synthesizer starts the LLM lazily
    text = "".join(res.response_gen)
    assert text == plain.response
    assert res.metadata["nest_spans"] == plain.metadata["nest_spans"]


async def test_async_stock_engine(index, tiny_lm):
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)
    sync = index.as_query_engine(llm=llm, similarity_top_k=4).query(QUESTION)
    res = await index.as_query_engine(llm=llm, similarity_top_k=4).aquery(QUESTION)
    assert res.response == sync.response
    assert res.metadata["nest_spans"] == sync.metadata["nest_spans"]
    assert_cites_real_nodes(res)


async def test_async_streaming_stock_engine_fills_span_metadata(index, tiny_lm):
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)
    plain = index.as_query_engine(llm=llm, similarity_top_k=4).query(QUESTION)
    res = await index.as_query_engine(llm=llm, similarity_top_k=4,
                                      streaming=True).aquery(QUESTION)
    text = "".join([piece async for piece in res.async_response_gen()])
    assert text == plain.response
    assert res.metadata["nest_spans"] == plain.metadata["nest_spans"]


def test_a_response_gets_spans_only_from_its_own_synthesis(index, tiny_lm):
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY,
                  retriever=ListRetriever(corpus_nodes()))
    llm.complete(QUESTION)  # a direct call leaves a completion behind in this thread
    stock = index.as_query_engine(llm=_EchoLLM(), similarity_top_k=2).query(QUESTION)
    assert "nest_spans" not in stock.metadata


def test_direct_complete_keeps_spans_in_additional_kwargs(tiny_lm):
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)
    nodes = corpus_nodes()
    prompt = DEFAULT_TEXT_QA_PROMPT.format(
        context_str="\n\n".join(n.node.get_content(metadata_mode="llm") for n in nodes),
        query_str=QUESTION)
    out = contextvars.Context().run(llm.complete, prompt)  # a thread with no retrieval yet
    # no retrieval event was seen for these nodes: the chunks are cited by position
    assert out.text == expected_for(tiny_lm, nodes).response
    assert {s["node_id"] for s in out.additional_kwargs["nest_spans"]} == {"context-1",
                                                                     "context-4"}


# --- the prompt parser --------------------------------------------------------------------
def test_parse_stock_text_qa_and_refine_prompts():
    qa = DEFAULT_TEXT_QA_PROMPT.format(context_str="title: A\n\nAlpha text.", query_str="Q?")
    assert parse_stock_prompt(qa).question == "Q?"
    assert parse_stock_prompt(qa).context == "title: A\n\nAlpha text."
    refine = DEFAULT_REFINE_PROMPT.format(query_str="Who?", existing_answer="Nobody.",
                                          context_msg="More text.")
    assert parse_stock_prompt(refine).question == "Who?"
    assert parse_stock_prompt(refine).context == "More text."
    assert parse_stock_prompt("Just a question?") is None
    assert retrieval_query(qa) == "Q?"
    assert retrieval_query("Query: where?\nAnswer: ") == "where?"
    assert retrieval_query("plain") == "plain"


def test_context_nodes_map_known_text_to_nodes_and_the_rest_to_stand_ins():
    a = NodeWithScore(node=TextNode(id_="a", text="Alpha one.\n\nAlpha two."), score=0.5)
    b = NodeWithScore(node=TextNode(id_="b", text="Beta."), score=0.4)
    context = "title: B\n\nBeta.\n\nsource: x.md\n\nAlpha one.\n\nAlpha two.\n\nGamma.\n\nk: v"
    nodes = context_nodes(context, [a, b])
    assert [(n.node.node_id, n.node.text) for n in nodes] == [
        ("b", "Beta."), ("a", "Alpha one.\n\nAlpha two."), ("context-1", "Gamma.")]
    assert nodes[2].node.metadata == {"prompt_offset": context.index("Gamma.")}
    assert nodes[1] is a


def test_similarity_cutoff_inside_stock_engine_still_maps_nodes(index, tiny_lm):
    llm = NestLLM(lm=tiny_lm, max_new_tokens=MAX_NEW, config=COPY_HEAVY)
    res = index.as_query_engine(llm=llm, similarity_top_k=3, node_postprocessors=[
        SimilarityPostprocessor(similarity_cutoff=0.5)]).query(QUESTION)
    assert len(res.source_nodes) == 3
    assert not any(s["node_id"].startswith("context-") for s in res.metadata["nest_spans"])


# --- helpers: real LlamaIndex base classes -------------------------------------------------
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402


class _KeepIds(BaseNodePostprocessor):
    ids: set[str]

    def _postprocess_nodes(self, nodes, query_bundle=None):
        return [n for n in nodes if n.node.node_id in self.ids]


class _EchoLLM(MockLLM):
    """LlamaIndex's MockLLM (echoes the prompt): a stock LLM next to NestLLM."""
