"""NestQueryEngine / NestLLM on the tiny random Llama: shapes, streaming, async, errors."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("llama_index.core")

from conftest import TINY_CORPUS
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle, TextNode

from nest_core import NestConfig
from nest_integrations.llama_index import NestLLM, NestQueryEngine, NestRetrievalError

QUESTION = "The Zephyr Widget Company was"
# On the tiny model (seed 0) Nest with the shipped defaults decodes the random LM's own
# tokens (byte pieces, hence U+FFFD) and copies two runs from node 0, the one holding the
# question's words (the prompt shows its best sentence; spans start there only): "Ostrava."
# glued to the LM's "ems" and "phyr", which its support by node 0 (below MIN_SUPPORT)
# does not make a citation.
EXPECTED = '�ore�emsOstrava.phyr ?�O�emsOstans7\x02��'
# α = 1 makes λ < δ whenever ρ < 1 and a tiny γ accepts nearly every draft token: the
# random model then copies whole runs of words, which are citations.
COPY_HEAVY = NestConfig(confidence_offset=1.0, relaxation=1e-6, span_length=8,
                        initial_span_length=2)
COPIED = " Ostrava. Pack my box with five dozen liquor jugs"
COPIED_SPANS = [("node-0", "Ostrava.", 1, 9),
                ("node-3", "Pack my box with five dozen liquor jugs", 10, 49)]


class ListRetriever(BaseRetriever):
    """A real retriever over a fixed node list (what a vector store would have returned)."""

    def __init__(self, nodes: list[NodeWithScore] | None = None,
                 error: Exception | None = None) -> None:
        super().__init__()
        self.nodes, self.error, self.calls = nodes or [], error, 0

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return list(self.nodes)


def corpus_nodes() -> list[NodeWithScore]:
    return [NodeWithScore(node=TextNode(id_=f"node-{i}", text=t, start_char_idx=1000 * i,
                                        metadata={"title": None, "_node_content": "{}",
                                                  "n": i}),
                          score=1.0 - i / 10)
            for i, t in enumerate(TINY_CORPUS)]


@pytest.fixture
def engine(tiny_lm):
    return NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                           max_new_tokens=24)


@pytest.fixture
def copying(tiny_lm):
    """An engine whose answer copies two runs of words (``COPIED``)."""
    return NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                           max_new_tokens=24, config=COPY_HEAVY)


def span_rows(spans: list[dict]) -> list[tuple]:
    return [(s["node_id"], s["cited_text"], s["out_start"], s["out_end"]) for s in spans]


def assert_spans_consistent(response_text: str, spans: list[dict], nodes: list[NodeWithScore]):
    by_id = {s.node.node_id: s.node for s in nodes}
    for s in spans:
        node = by_id[s["node_id"]]
        assert response_text[s["out_start"]:s["out_end"]] == s["cited_text"]
        assert node.text[s["src_start"]:s["src_end"]] == s["cited_text"]
        assert s["doc_start"] == node.start_char_idx + s["src_start"]
        assert nodes[s["source_index"] - 1].node.node_id == s["node_id"]


def test_constructor_loads_nothing(tiny_lm):
    eng = NestQueryEngine(retriever=ListRetriever(corpus_nodes()))
    assert eng._decoder._decoder is None
    assert eng.max_new_tokens == 128
    assert eng.streaming is False


def test_query_returns_stock_response_shape_with_spans(engine):
    res = engine.query(QUESTION)
    assert isinstance(res, Response)
    assert res.response == EXPECTED
    assert [n.node.node_id for n in res.source_nodes] == [f"node-{i}" for i in range(6)]
    assert res.metadata["node-2"] == {"title": None, "n": 2}  # "_node_content" stripped
    # copied, but no citation: "Ostrava." starts inside "emsOstrava.", and the answer's
    # support by what the decoder showed is below MIN_SUPPORT
    assert res.metadata["nest_spans"] == []
    assert res.metadata["nest_finish_reason"] in {"length", "eos"}
    assert res.metadata["nest_attribution_ratio"] == pytest.approx(7 / 24)  # 7 copied of 24


def test_copied_runs_of_words_are_cited(copying):
    res = copying.query(QUESTION)
    assert res.response == COPIED
    assert span_rows(res.metadata["nest_spans"]) == COPIED_SPANS
    assert_spans_consistent(res.response, res.metadata["nest_spans"], res.source_nodes)


def test_spans_match_the_decoders_own_citations(copying, tiny_lm):
    """The assembler's merge of streamed pieces equals NestResult.cited_spans()."""
    from nest_core import NestDecoder
    from nest_integrations.llama_index import nodes_to_passages

    passages, _ = nodes_to_passages(corpus_nodes())
    result = NestDecoder(tiny_lm, COPY_HEAVY).generate(QUESTION, passages, max_new_tokens=24)
    res = copying.query(QUESTION)
    assert res.response == result.text
    assert [(s["node_id"], s["out_start"], s["out_end"], s["src_start"], s["src_end"])
            for s in res.metadata["nest_spans"]] == [
        (s.passage.id, s.out_start, s.out_end, s.src_start, s.src_end)
        for s in result.cited_spans()]


def test_citation_markers(tiny_lm):
    eng = NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                          max_new_tokens=24, citation_markers=True, config=COPY_HEAVY)
    res = eng.query(QUESTION)
    assert res.response == " Ostrava. [1] Pack my box with five dozen liquor jugs [4]"
    assert res.metadata["nest_text"] == COPIED
    assert_spans_consistent(res.response, res.metadata["nest_spans"], res.source_nodes)


def test_no_marker_for_an_unsupported_answer(tiny_lm):
    """The shipped defaults' answer copies "phyr", a whole word; the answer is unsupported,
    so the held (non-streaming) text gets no marker for it."""
    eng = NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                          max_new_tokens=24, citation_markers=True)
    res = eng.query(QUESTION)
    assert res.response == EXPECTED
    assert res.metadata["nest_spans"] == []


@pytest.mark.parametrize("markers", [False, True])
def test_streaming_equals_non_streaming_and_fills_metadata(tiny_lm, markers):
    kw = {"retriever": ListRetriever(corpus_nodes()), "lm": tiny_lm, "max_new_tokens": 24,
          "citation_markers": markers, "config": COPY_HEAVY}
    plain = NestQueryEngine(**kw).query(QUESTION)
    res = NestQueryEngine(streaming=True, **kw).query(QUESTION)
    assert isinstance(res, StreamingResponse)
    assert res.metadata["nest_spans"] == []  # nothing decoded yet
    seen, text = [], ""
    for piece in res.response_gen:
        text += piece
        seen.append(len(res.metadata["nest_spans"]))
    assert text == plain.response
    assert seen[-1] >= 1
    assert seen[0] == 0
    assert res.metadata["nest_spans"] == plain.metadata["nest_spans"]


@pytest.mark.parametrize("use_async", [True, False])
async def test_async_and_sync_agree(tiny_lm, use_async):
    retriever = ListRetriever(corpus_nodes())
    eng = NestQueryEngine(retriever=retriever, lm=tiny_lm, max_new_tokens=24)
    res = await eng.aquery(QUESTION) if use_async else eng.query(QUESTION)
    assert res.response == EXPECTED
    assert retriever.calls == 1


async def test_async_streaming(tiny_lm):
    eng = NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                          max_new_tokens=24, streaming=True, config=COPY_HEAVY)
    res = await eng.aquery(QUESTION)
    assert isinstance(res, AsyncStreamingResponse)
    text = "".join([p async for p in res.async_response_gen()])
    assert text == COPIED
    assert span_rows(res.metadata["nest_spans"]) == COPIED_SPANS


def test_empty_retrieval_is_a_clear_error(tiny_lm):
    eng = NestQueryEngine(retriever=ListRetriever([]), lm=tiny_lm)
    with pytest.raises(NestRetrievalError, match=r"returned no nodes \(is the index empty\?\)"):
        eng.query(QUESTION)


async def test_failing_retriever_is_wrapped_with_its_cause(tiny_lm):
    boom = ConnectionError("chroma server unreachable")
    eng = NestQueryEngine(retriever=ListRetriever(error=boom), lm=tiny_lm)
    with pytest.raises(NestRetrievalError, match="ListRetriever failed for query") as info:
        eng.query(QUESTION)
    assert info.value.__cause__ is boom
    with pytest.raises(NestRetrievalError, match="chroma server unreachable"):
        await eng.aquery(QUESTION)


def test_image_nodes_are_skipped_and_image_only_is_an_error(tiny_lm, caplog):
    image = NodeWithScore(node=ImageNode(id_="img", image_url="http://example.invalid/a.png"),
                          score=0.99)
    eng = NestQueryEngine(retriever=ListRetriever([image, *corpus_nodes()]), lm=tiny_lm,
                          max_new_tokens=24)
    with caplog.at_level(logging.WARNING):
        res = eng.query(QUESTION)
    assert "skipping node img (ImageNode)" in caplog.text
    assert "img" not in [n.node.node_id for n in res.source_nodes]
    assert res.response == EXPECTED
    only = NestQueryEngine(retriever=ListRetriever([image]), lm=tiny_lm)
    with pytest.raises(NestRetrievalError, match="1 node\\(s\\), none with text"):
        only.query(QUESTION)


def test_from_vector_store_refuses_vectors_only_stores_and_missing_embeddings():
    faiss = pytest.importorskip("faiss")
    from llama_index.vector_stores.faiss import FaissVectorStore

    store = FaissVectorStore(faiss_index=faiss.IndexFlatL2(4))
    with pytest.raises(ValueError, match="embed_model is required"):
        NestQueryEngine.from_vector_store(store, embed_model=None)
    from llama_index.core.embeddings import MockEmbedding

    with pytest.raises(ValueError, match=r"keeps vectors only.*load_index_from_storage"):
        NestQueryEngine.from_vector_store(store, embed_model=MockEmbedding(embed_dim=4))


def test_nest_llm_completes_with_spans_and_streams_the_same(tiny_lm):
    retriever = ListRetriever(corpus_nodes())
    llm = NestLLM(retriever=retriever, lm=tiny_lm, max_new_tokens=24, config=COPY_HEAVY)
    assert llm.metadata.num_output == 24
    assert llm._decoder._decoder is None
    out = llm.complete(QUESTION)
    assert out.text == COPIED
    assert span_rows(out.additional_kwargs["nest_spans"]) == COPIED_SPANS
    streamed = list(llm.stream_complete(QUESTION))
    assert streamed[-1].text == COPIED
    assert "".join(r.delta or "" for r in streamed) == COPIED
    assert span_rows(streamed[-1].additional_kwargs["nest_spans"]) == COPIED_SPANS


async def test_nest_llm_acomplete(tiny_lm):
    llm = NestLLM(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm, max_new_tokens=24)
    out = await llm.acomplete(QUESTION)
    assert out.text == EXPECTED


def test_nest_llm_without_passages_decodes_plainly_and_says_so_once(tiny_lm, caplog):
    llm = NestLLM(retriever=ListRetriever([]), lm=tiny_lm, max_new_tokens=8)
    with caplog.at_level(logging.WARNING):
        out = llm.complete(QUESTION)
        llm.complete(QUESTION)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("NestLLM found no passages to copy from")
    assert "NestQueryEngine.from_index(index)" in warning  # it names the fix
    assert out.additional_kwargs["nest_spans"] == []
    from nest_core import NestDecoder

    assert out.text == NestDecoder(tiny_lm).generate(QUESTION, [], max_new_tokens=8).text
