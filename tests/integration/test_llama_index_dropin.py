"""LlamaIndex drop-in scenarios on the real SmolLM2, the bundled MiniLM and real stores on disk.

The handbook in examples/data is loaded with ``SimpleDirectoryReader`` and split with
``SentenceSplitter``, as a LlamaIndex user would: a persistent Chroma collection (reopened
from disk) and a persisted FAISS index (reloaded with ``load_index_from_storage``).
Scenarios: a query engine with a similarity cutoff; LlamaDebugHandler through
``Settings.callback_manager``; the chat engine answering a follow-up with citations;
``Settings.llm = NestLLM()`` inside ``index.as_query_engine()`` with span metadata; the agent
tool's output with its sources.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_index.vector_stores.chroma")
pytest.importorskip("llama_index.vector_stores.faiss")

import chromadb
from chromadb.config import Settings as ChromaSettings
from llama_index.core import (
    Settings,
    SimpleDirectoryReader,
    StorageContext,
    VectorStoreIndex,
    load_index_from_storage,
)
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.postprocessor import SimilarityPostprocessor
from llama_index.vector_stores.chroma import ChromaVectorStore
from llama_index.vector_stores.faiss import FaissVectorStore

from nest_integrations.llama_index import (
    NestChatEngine,
    NestLLM,
    NestQueryEngine,
    bundled_embedding,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
MAX_NEW = 40
GHENT = "When did the Ghent office open?"


@pytest.fixture(scope="module")
def embed_model():
    return bundled_embedding()


@pytest.fixture(scope="module")
def handbook_nodes():
    docs = SimpleDirectoryReader(str(DATA)).load_data()
    return SentenceSplitter(chunk_size=160, chunk_overlap=20).get_nodes_from_documents(docs)


def _chroma_collection(path: Path):
    client = chromadb.PersistentClient(path=str(path),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    return client.get_or_create_collection("handbook", embedding_function=None)


@pytest.fixture(scope="module")
def chroma_index(tmp_path_factory, handbook_nodes, embed_model):
    """Built into a persistent Chroma directory, then reopened from disk."""
    path = tmp_path_factory.mktemp("chroma")
    storage = StorageContext.from_defaults(
        vector_store=ChromaVectorStore(chroma_collection=_chroma_collection(path)))
    VectorStoreIndex(handbook_nodes, storage_context=storage, embed_model=embed_model)
    reopened = ChromaVectorStore(chroma_collection=_chroma_collection(path))
    return VectorStoreIndex.from_vector_store(reopened, embed_model=embed_model)


@pytest.fixture(scope="module")
def faiss_index(tmp_path_factory, handbook_nodes, embed_model):
    """Persisted with its docstore, reloaded with load_index_from_storage."""
    import faiss

    path = tmp_path_factory.mktemp("faiss")
    storage = StorageContext.from_defaults(
        vector_store=FaissVectorStore(faiss_index=faiss.IndexFlatL2(384)))
    VectorStoreIndex(handbook_nodes, storage_context=storage, embed_model=embed_model)
    storage.persist(persist_dir=str(path))
    store = FaissVectorStore.from_persist_dir(str(path))
    storage = StorageContext.from_defaults(vector_store=store, persist_dir=str(path))
    return load_index_from_storage(storage, embed_model=embed_model)


def assert_spans_exact(text: str, metadata: dict, source_nodes) -> set[str]:
    """Every span is the node's text at its offsets and the answer's at its own; returns
    the file names the spans cite."""
    files = set()
    for s in metadata["nest_spans"] + metadata["nest_matches"]:
        node = source_nodes[s["source_index"] - 1].node
        assert node.node_id == s["node_id"]
        assert node.get_content()[s["src_start"]:s["src_end"]] == s["cited_text"]
        assert text[s["out_start"]:s["out_end"]] == s["cited_text"]
        files.add(node.metadata["file_name"])
    return files


# --- (1) query engine with node postprocessors ---------------------------------------------
def test_similarity_cutoff_drops_nodes_and_the_answer_cites_what_is_left(chroma_index):
    plain = NestQueryEngine.from_index(chroma_index, similarity_top_k=3,
                                       max_new_tokens=MAX_NEW)
    cutoff = 0.5
    engine = NestQueryEngine.from_index(
        chroma_index, similarity_top_k=3, max_new_tokens=MAX_NEW,
        node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=cutoff)])
    bundle_nodes = plain.retrieve(_bundle(GHENT))
    assert len(bundle_nodes) == 3
    assert any(n.score < cutoff for n in bundle_nodes), "the cutoff must drop a node here"
    res = engine.query(GHENT)
    assert 0 < len(res.source_nodes) < 3
    assert all(n.score >= cutoff for n in res.source_nodes)
    assert "2019" in res.response
    assert res.metadata["nest_spans"]
    assert assert_spans_exact(res.response, res.metadata, res.source_nodes) == {
        "02-offices.md"}


def test_cutoff_no_node_passes_gives_the_empty_response(chroma_index):
    engine = NestQueryEngine.from_index(
        chroma_index, similarity_top_k=3,
        node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=0.99)])
    res = engine.query(GHENT)
    assert res.response == "Empty Response"
    assert res.source_nodes == []
    assert res.metadata["nest_spans"] == []


# --- (2) callbacks through Settings ---------------------------------------------------------
def test_llama_debug_handler_from_settings_sees_the_query(faiss_index, embed_model):
    debug = LlamaDebugHandler(print_trace_on_end=False)
    before = Settings._callback_manager
    Settings.callback_manager = CallbackManager([debug])
    try:
        engine = NestQueryEngine.from_index(faiss_index, similarity_top_k=2,
                                            max_new_tokens=16)
        res = engine.query(GHENT)
    finally:
        Settings._callback_manager = before
    for kind in (CBEventType.QUERY, CBEventType.RETRIEVE, CBEventType.SYNTHESIZE,
                 CBEventType.LLM):
        assert len(debug.get_event_pairs(kind)) == 1, kind
    [(_, llm_end)] = debug.get_event_pairs(CBEventType.LLM)
    assert llm_end.payload["completion"].text == res.response


# --- (4) chat engine: a follow-up answered with citations -----------------------------------
def test_chat_engine_answers_a_follow_up_with_citations(chroma_index):
    chat = NestChatEngine.from_defaults(NestQueryEngine.from_index(
        chroma_index, similarity_top_k=3, max_new_tokens=MAX_NEW))
    first = chat.chat("Who founded Halvorsen Orchard Robotics?")
    assert "Odile Halvorsen" in first.response
    follow = chat.chat("And where is its headquarters?")
    assert follow.sources[0].raw_input == {
        "query": "Where is Halvorsen Orchard Robotics' headquarters?"}
    assert "Dunmore" in follow.response
    files = assert_spans_exact(follow.response, follow.metadata, follow.source_nodes)
    assert "02-offices.md" in files
    assert any("Dunmore" in s["cited_text"] for s in follow.metadata["nest_spans"])
    assert len(chat.chat_history) == 4


# --- (3) Settings.llm = NestLLM inside a stock engine ----------------------------------------
@pytest.mark.parametrize("which", ["chroma", "faiss"])
def test_settings_llm_nest_in_as_query_engine_returns_span_metadata(request, which):
    index = request.getfixturevalue(f"{which}_index")
    before = Settings._llm
    Settings.llm = NestLLM(max_new_tokens=MAX_NEW)
    try:
        res = index.as_query_engine(similarity_top_k=3).query(GHENT)
    finally:
        Settings._llm = before
    assert "2019" in res.response
    spans = res.metadata["nest_spans"]
    assert spans
    ids = {n.node.node_id for n in res.source_nodes}
    assert {s["node_id"] for s in spans} <= ids  # real node ids, not prompt positions
    assert assert_spans_exact(res.response, res.metadata, res.source_nodes) == {
        "02-offices.md"}


def _bundle(text: str):
    from llama_index.core.schema import QueryBundle

    return QueryBundle(text)


# --- agent: QueryEngineTool output shows its sources -----------------------------------------
async def test_function_agent_tool_output_lists_the_cited_handbook_page(faiss_index):
    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
    from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
    from llama_index.core.llms import MockFunctionCallingLLM

    from nest_integrations.llama_index import NestQueryEngineTool

    def scripted(messages, **kwargs):
        """Stands in for a tool-calling LLM (SmolLM2-135M cannot call tools reliably)."""
        results = [m for m in messages if m.role == MessageRole.TOOL]
        if results:
            return ChatMessage(role=MessageRole.ASSISTANT, content=results[-1].content)
        return ChatMessage(role=MessageRole.ASSISTANT, blocks=[ToolCallBlock(
            tool_call_id="c1", tool_name="handbook", tool_kwargs={"input": GHENT})])

    tool = NestQueryEngineTool.from_defaults(
        NestQueryEngine.from_index(faiss_index, similarity_top_k=3, max_new_tokens=MAX_NEW),
        name="handbook", description="Answers questions about the staff handbook.")
    agent = FunctionAgent(tools=[tool], llm=MockFunctionCallingLLM(
        response_generator=scripted))
    handler = agent.run(user_msg=GHENT)
    [result] = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    await handler
    response = result.tool_output.raw_output
    content = result.tool_output.content
    assert "2019" in response.response
    assert content.startswith(response.response + "\n\nSources:\n")
    assert "02-offices.md: " in content
    assert assert_spans_exact(response.response, response.metadata,
                              response.source_nodes) == {"02-offices.md"}
    for s in response.metadata["nest_spans"]:
        assert s["cited_text"].strip() in content
