"""NestQueryEngine as a stock engine: postprocessors, refused options, retrieve/synthesize,
callback events (LlamaDebugHandler) and instrumentation events, on the tiny random Llama."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

import llama_index.core.instrumentation as instrument
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.postprocessor import SimilarityPostprocessor
from llama_index.core.schema import QueryBundle
from test_llama_index_engine import EXPECTED, QUESTION, ListRetriever, corpus_nodes

from nest_integrations.llama_index import NestQueryEngine


class Recorder(BaseEventHandler):
    """A real instrumentation handler that keeps the class name of every event it sees."""

    names: list[str] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: BaseEvent, **kwargs) -> None:
        self.names.append(event.class_name())


@pytest.fixture
def recorder():
    root = instrument.get_dispatcher()
    handler = Recorder()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


def engine_with(tiny_lm, **kw):
    return NestQueryEngine(retriever=ListRetriever(corpus_nodes()), lm=tiny_lm,
                           max_new_tokens=24, **kw)


# --- node postprocessors ------------------------------------------------------------------
@pytest.mark.parametrize("use_async", [True, False])
async def test_similarity_cutoff_drops_nodes_before_decoding(tiny_lm, use_async):
    # scores are 1.0, 0.9, ... 0.5: a cutoff of 0.75 keeps the first three nodes
    eng = engine_with(tiny_lm, node_postprocessors=[
        SimilarityPostprocessor(similarity_cutoff=0.75)])
    res = await eng.aquery(QUESTION) if use_async else eng.query(QUESTION)
    assert [n.node.node_id for n in res.source_nodes] == ["node-0", "node-1", "node-2"]
    assert set(res.metadata) - {"node-0", "node-1", "node-2"} <= {
        "nest_spans", "nest_matches", "nest_stats", "nest_attribution_ratio",
        "nest_finish_reason", "nest_quoted"}
    assert {s["node_id"] for s in res.metadata["nest_spans"]} <= {"node-0", "node-1",
                                                                   "node-2"}
    assert res.metadata["nest_stats"]["datastore_keys"] > 0


@pytest.mark.parametrize("use_async", [True, False])
async def test_cutoff_that_drops_every_node_gives_the_stock_empty_response(tiny_lm,
                                                                           use_async):
    eng = engine_with(tiny_lm, node_postprocessors=[SimilarityPostprocessor(
        similarity_cutoff=2.0)])
    res = await eng.aquery(QUESTION) if use_async else eng.query(QUESTION)
    assert isinstance(res, Response)
    assert res.response == "Empty Response"
    assert res.source_nodes == []
    assert res.metadata == {"nest_spans": [], "nest_matches": []}
    assert eng._decoder._decoder is None  # nothing was decoded, not even the model loaded


def test_cutoff_that_drops_every_node_can_answer_plainly_without_citations(tiny_lm):
    from nest_core import NestDecoder

    eng = engine_with(tiny_lm, empty_response=None,
                      node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=2.0)])
    res = eng.query(QUESTION)
    assert res.response == NestDecoder(tiny_lm).generate(QUESTION, [],
                                                         max_new_tokens=24).text
    assert res.source_nodes == []
    assert res.metadata["nest_spans"] == []
    assert res.metadata["nest_matches"] == []


def test_streaming_empty_response(tiny_lm):
    eng = engine_with(tiny_lm, streaming=True,
                      node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=2.0)])
    res = eng.query(QUESTION)
    assert isinstance(res, StreamingResponse)
    assert "".join(res.response_gen) == "Empty Response"


# --- options that cannot apply ------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "fix"), [
    ({"llm": object()}, "model_name="),
    ({"response_mode": "tree_summarize"}, "Settings.llm = NestLLM"),
    ({"text_qa_template": "Context: {context_str}"}, "system_prompt="),
    ({"response_synthesizer": object()}, "its own synthesizer"),
    ({"output_cls": dict}, "structured output"),
])
def test_stock_only_options_are_refused_with_the_fix(tiny_lm, kwargs, fix):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"does not support {name}=") as info:
        engine_with(tiny_lm, **kwargs)
    assert fix in str(info.value)


def test_compact_response_mode_is_what_nest_does_and_unknown_names_are_refused(tiny_lm):
    from llama_index.core.response_synthesizers import ResponseMode

    assert engine_with(tiny_lm, response_mode=ResponseMode.COMPACT).query(
        QUESTION).response == EXPECTED
    with pytest.raises(ValueError, match="similarity_cutof"):
        engine_with(tiny_lm, similarity_cutof=0.5)


def test_from_index_splits_engine_and_retriever_options_like_as_query_engine(tiny_lm):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import TextNode

    index = VectorStoreIndex([TextNode(text=t) for t in ("alpha beta", "gamma delta")],
                             embed_model=MockEmbedding(embed_dim=4))
    eng = NestQueryEngine.from_index(index, similarity_top_k=1, lm=tiny_lm,
                                     max_new_tokens=5, vector_store_query_mode="default")
    assert eng.max_new_tokens == 5
    assert eng.retriever._similarity_top_k == 1
    with pytest.raises(ValueError, match="does not support llm="):
        NestQueryEngine.from_index(index, llm=object())


# --- retrieve / synthesize ----------------------------------------------------------------
def test_retrieve_applies_postprocessors_and_synthesize_decodes_given_nodes(tiny_lm):
    retriever = ListRetriever(corpus_nodes())
    eng = NestQueryEngine(retriever=retriever, lm=tiny_lm, max_new_tokens=24,
                          node_postprocessors=[SimilarityPostprocessor(
                              similarity_cutoff=0.85)])
    bundle = QueryBundle(QUESTION)
    nodes = eng.retrieve(bundle)
    assert [n.node.node_id for n in nodes] == ["node-0", "node-1"]
    res = eng.synthesize(bundle, nodes, additional_source_nodes=corpus_nodes()[5:])
    assert retriever.calls == 1  # synthesize does not retrieve
    assert [n.node.node_id for n in res.source_nodes] == ["node-0", "node-1", "node-5"]
    assert res.response == engine_with(tiny_lm).synthesize(bundle, nodes).response
    assert {s["node_id"] for s in res.metadata["nest_spans"]} <= {"node-0", "node-1"}


async def test_async_retrieve_and_synthesize_agree_with_sync(tiny_lm):
    eng = engine_with(tiny_lm)
    bundle = QueryBundle(QUESTION)
    nodes = await eng.aretrieve(bundle)
    assert [n.node.node_id for n in nodes] == [n.node.node_id for n in eng.retrieve(bundle)]
    res = await eng.asynthesize(bundle, nodes)
    assert res.response == EXPECTED
    assert res.metadata["nest_spans"] == eng.synthesize(bundle, nodes).metadata["nest_spans"]


# --- callbacks and instrumentation --------------------------------------------------------
@pytest.mark.parametrize("use_async", [True, False])
async def test_llama_debug_handler_sees_query_retrieve_synthesize_llm(tiny_lm, use_async):
    debug = LlamaDebugHandler(print_trace_on_end=False)
    cm = CallbackManager([debug])
    eng = engine_with(tiny_lm, callback_manager=cm,
                      node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=0.75)])
    res = await eng.aquery(QUESTION) if use_async else eng.query(QUESTION)
    for kind in (CBEventType.QUERY, CBEventType.RETRIEVE, CBEventType.SYNTHESIZE,
                 CBEventType.LLM):
        pairs = debug.get_event_pairs(kind)
        assert len(pairs) == 1, f"{kind}: {pairs}"
        start, end = pairs[0]
        assert end.id_ == start.id_
    llm_end = debug.get_llm_inputs_outputs()[0][1]
    assert llm_end.payload["completion"].text == res.response
    assert llm_end.payload["completion"].additional_kwargs["nest_spans"] == \
        res.metadata["nest_spans"]
    # nesting as in stock engines: SYNTHESIZE and RETRIEVE under QUERY, LLM under SYNTHESIZE
    query_id = debug.get_event_pairs(CBEventType.QUERY)[0][0].id_
    synth_id = debug.get_event_pairs(CBEventType.SYNTHESIZE)[0][0].id_
    trace = debug._trace_map  # what print_trace_map() draws
    assert synth_id in trace[query_id]
    assert debug.get_event_pairs(CBEventType.LLM)[0][0].id_ in trace[synth_id]


def test_streaming_llm_event_ends_when_the_stream_does(tiny_lm):
    debug = LlamaDebugHandler(print_trace_on_end=False)
    eng = engine_with(tiny_lm, streaming=True, callback_manager=CallbackManager([debug]))
    res = eng.query(QUESTION)
    assert debug.get_event_pairs(CBEventType.LLM) == []  # started, not ended
    text = "".join(res.response_gen)
    [(_, end)] = debug.get_event_pairs(CBEventType.LLM)
    assert end.payload["completion"].text == text == EXPECTED


@pytest.mark.parametrize("use_async", [True, False])
async def test_instrumentation_handlers_see_the_stock_event_sequence(tiny_lm, recorder,
                                                                     use_async):
    eng = engine_with(tiny_lm)
    _ = await eng.aquery(QUESTION) if use_async else eng.query(QUESTION)
    wanted = ["QueryStartEvent", "RetrievalStartEvent", "RetrievalEndEvent",
              "SynthesizeStartEvent", "LLMCompletionStartEvent", "LLMCompletionEndEvent",
              "SynthesizeEndEvent", "QueryEndEvent"]
    assert [n for n in recorder.names if n in wanted] == wanted


def test_settings_callback_manager_reaches_a_retriever_built_before_it(tiny_lm):
    from llama_index.core import Settings

    retriever = ListRetriever(corpus_nodes())  # built while Settings had no handler
    debug = LlamaDebugHandler(print_trace_on_end=False)
    before = Settings._callback_manager
    Settings.callback_manager = CallbackManager([debug])
    try:
        eng = NestQueryEngine(retriever=retriever, lm=tiny_lm, max_new_tokens=4)
    finally:
        Settings._callback_manager = before
    eng.query(QUESTION)
    assert len(debug.get_event_pairs(CBEventType.RETRIEVE)) == 1
    assert len(debug.get_event_pairs(CBEventType.QUERY)) == 1


def test_from_args_mirrors_retriever_query_engine_from_args(tiny_lm):
    retriever = ListRetriever(corpus_nodes())
    eng = NestQueryEngine.from_args(
        retriever, lm=tiny_lm, max_new_tokens=24, streaming=False, use_async=False,
        node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=0.95)])
    res = eng.query(QUESTION)
    assert [n.node.node_id for n in res.source_nodes] == ["node-0"]
    with pytest.raises(ValueError, match="does not support use_async=True"):
        NestQueryEngine.from_args(retriever, use_async=True)
    with pytest.raises(ValueError, match="does not support refine_template="):
        NestQueryEngine.from_args(retriever, refine_template="{context_msg}")
