"""LlamaIndex integration on the real SmolLM2, the bundled MiniLM and real stores on disk.

Chroma: a persistent collection built by LlamaIndex and reopened from disk, and one written
the way LangChain (or another tool) writes it, with ``_``-prefixed keys in its metadata.
FAISS: persisted with its StorageContext and reloaded with ``load_index_from_storage``.
Answers are short (24 tokens) to keep the file around a minute on 2 CPU cores.
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("llama_index.vector_stores.chroma")
pytest.importorskip("llama_index.vector_stores.faiss")

import chromadb
from chromadb.config import Settings as ChromaSettings
from llama_index.core import Document, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.base.response.schema import StreamingResponse
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import ImageNode
from llama_index.vector_stores.chroma import ChromaVectorStore
from llama_index.vector_stores.faiss import FaissVectorStore

from nest_integrations.llama_index import NestQueryEngine, NestRetrievalError, bundled_embedding

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCS = [
    Document(doc_id="zephyr", metadata={"title": "Zephyr Widget Company", "source": "z.txt"},
             text="The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in "
                  "Ostrava. It makes brass widgets for tower clocks and ships them to "
                  "forty countries. Its headquarters moved to Brno in 2004."),
    Document(doc_id="foldoc", metadata={"title": "FOLDOC", "source": "f.txt"},
             text="FOLDOC is the Free On-line Dictionary of Computing, a searchable "
                  "dictionary of acronyms, jargon and programming languages started by "
                  "Denis Howe in 1985."),
    Document(doc_id="compiler", metadata={"title": "Compiler", "source": "c.txt"},
             text="A compiler translates source code into machine code before the program "
                  "runs; an interpreter executes the source code directly, statement by "
                  "statement."),
]
QUESTION = "Who founded the Zephyr Widget Company?"
MAX_NEW = 24


@pytest.fixture(scope="module")
def embed_model():
    return bundled_embedding()


@pytest.fixture(scope="module")
def nodes():
    return SentenceSplitter(chunk_size=48, chunk_overlap=0).get_nodes_from_documents(DOCS)


def chroma_client(path):
    return chromadb.PersistentClient(path=str(path),
                                     settings=ChromaSettings(anonymized_telemetry=False))


@pytest.fixture
def chroma_dir(tmp_path, nodes, embed_model):
    """A LlamaIndex-built persistent Chroma collection; returns its directory."""
    path = tmp_path / "chroma"
    # embedding_function=None: chromadb's default would download a model; we pass vectors
    coll = chroma_client(path).create_collection("docs", embedding_function=None)
    storage = StorageContext.from_defaults(vector_store=ChromaVectorStore(chroma_collection=coll))
    VectorStoreIndex(nodes, storage_context=storage, embed_model=embed_model)
    return path


def reopen_chroma(path, name="docs"):
    coll = chroma_client(path).get_collection(name, embedding_function=None)
    return ChromaVectorStore(chroma_collection=coll)


def assert_spans_consistent(res):
    """Every span cites exactly its node's text, and the response shows the same text."""
    text = res.response if hasattr(res, "response") else res.response_txt
    by_id = {n.node.node_id: n.node for n in res.source_nodes}
    docs = {d.doc_id: d.text for d in DOCS}
    for s in res.metadata["nest_spans"]:
        node = by_id[s["node_id"]]
        assert text[s["out_start"]:s["out_end"]] == s["cited_text"]
        assert node.get_content()[s["src_start"]:s["src_end"]] == s["cited_text"]
        assert res.source_nodes[s["source_index"] - 1].node.node_id == s["node_id"]
        if s["ref_doc_id"] in docs:
            assert docs[s["ref_doc_id"]][s["doc_start"]:s["doc_end"]] == s["cited_text"]


def test_chroma_reopened_from_disk_answers_with_spans(chroma_dir, embed_model):
    engine = NestQueryEngine.from_vector_store(reopen_chroma(chroma_dir),
                                               embed_model=embed_model, similarity_top_k=3,
                                               max_new_tokens=MAX_NEW)
    res = engine.query(QUESTION)
    assert res.source_nodes[0].node.ref_doc_id == "zephyr"
    assert res.response.strip()
    spans = res.metadata["nest_spans"]
    assert spans, f"expected copied spans in {res.response!r}"
    assert "zephyr" in {s["ref_doc_id"] for s in spans}
    assert all("doc_start" in s for s in spans)
    assert_spans_consistent(res)
    for n in res.source_nodes:
        assert res.metadata[n.node.node_id] == {k: v for k, v in n.node.metadata.items()
                                                if not k.startswith("_")}
    assert res.metadata[res.source_nodes[0].node.node_id]["title"] == "Zephyr Widget Company"


def test_chroma_collection_with_private_keys_written_by_another_tool(tmp_path, embed_model):
    """LangChain-style rows (no parsable node JSON) plus ``_`` keys: cited without them."""
    texts = [d.text for d in DOCS]
    coll = chroma_client(tmp_path / "lc").create_collection("lc-docs", embedding_function=None)
    coll.add(ids=["lc-zephyr", "lc-foldoc", "lc-compiler"], documents=texts,
             embeddings=embed_model.get_text_embedding_batch(texts),
             metadatas=[{**d.metadata, "_node_content": "{not json", "_node_type": "x",
                         "_private": 1} for d in DOCS])
    engine = NestQueryEngine.from_vector_store(reopen_chroma(tmp_path / "lc", "lc-docs"),
                                               embed_model=embed_model, similarity_top_k=2,
                                               max_new_tokens=MAX_NEW, citation_markers=True)
    res = engine.query(QUESTION)
    assert res.source_nodes[0].node.node_id == "lc-zephyr"
    assert "_node_content" in res.source_nodes[0].node.metadata  # the store gave it to us
    assert res.metadata["lc-zephyr"] == {"title": "Zephyr Widget Company", "source": "z.txt"}
    assert res.metadata["nest_spans"]
    assert res.response.count(" [1]") >= 1  # CitationQueryEngine-style marker
    assert_spans_consistent(res)
    assert res.metadata["nest_text"] == res.response.replace(" [1]", "").replace(" [2]", "")


@pytest.fixture
def faiss_dir(tmp_path, nodes, embed_model):
    import faiss

    store = FaissVectorStore(faiss_index=faiss.IndexFlatL2(384))
    storage = StorageContext.from_defaults(vector_store=store)
    VectorStoreIndex(nodes, storage_context=storage, embed_model=embed_model)
    storage.persist(persist_dir=str(tmp_path / "faiss"))
    return tmp_path / "faiss"


def reload_faiss(path, embed_model):
    store = FaissVectorStore.from_persist_dir(str(path))
    storage = StorageContext.from_defaults(vector_store=store, persist_dir=str(path))
    return load_index_from_storage(storage, embed_model=embed_model)


@pytest.mark.parametrize("use_async", [True, False])
async def test_faiss_reloaded_sync_async_and_streaming_agree(faiss_dir, embed_model, use_async):
    engine = NestQueryEngine.from_index(reload_faiss(faiss_dir, embed_model),
                                        similarity_top_k=3, max_new_tokens=MAX_NEW)
    res = await engine.aquery(QUESTION) if use_async else engine.query(QUESTION)
    assert res.source_nodes[0].node.ref_doc_id == "zephyr"
    assert res.metadata["nest_spans"]
    assert_spans_consistent(res)
    streaming = NestQueryEngine.from_index(reload_faiss(faiss_dir, embed_model),
                                           similarity_top_k=3, max_new_tokens=MAX_NEW,
                                           streaming=True).query(QUESTION)
    assert isinstance(streaming, StreamingResponse)
    assert str(streaming) == res.response
    assert streaming.metadata["nest_spans"] == res.metadata["nest_spans"]


def test_faiss_store_alone_is_refused_with_the_fix(faiss_dir, embed_model):
    with pytest.raises(ValueError, match="load_index_from_storage"):
        NestQueryEngine.from_vector_store(FaissVectorStore.from_persist_dir(str(faiss_dir)),
                                          embed_model=embed_model)


def test_empty_chroma_collection_is_a_clear_error(tmp_path, embed_model):
    client = chroma_client(tmp_path / "empty")
    coll = client.create_collection("empty-docs", embedding_function=None)
    engine = NestQueryEngine.from_vector_store(ChromaVectorStore(chroma_collection=coll),
                                               embed_model=embed_model)
    with pytest.raises(NestRetrievalError, match="is the index empty"):
        engine.query(QUESTION)


def test_image_nodes_in_the_store_are_skipped(chroma_dir, embed_model, caplog):
    store = reopen_chroma(chroma_dir)
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed_model)
    index.insert_nodes([ImageNode(id_="picture", text="",
                                  image_url="http://example.invalid/zephyr.png")])
    engine = NestQueryEngine.from_index(index, similarity_top_k=50, max_new_tokens=8)
    with caplog.at_level(logging.WARNING, logger="nest_integrations.llama_index.nodes"):
        res = engine.query(QUESTION)
    assert "skipping node picture (ImageNode)" in caplog.text
    assert "picture" not in {n.node.node_id for n in res.source_nodes}
    assert_spans_consistent(res)


def test_a_store_that_fails_mid_session_raises_with_its_cause(chroma_dir, embed_model):
    engine = NestQueryEngine.from_vector_store(reopen_chroma(chroma_dir),
                                               embed_model=embed_model, max_new_tokens=8)
    chroma_client(chroma_dir).delete_collection("docs")
    with pytest.raises(NestRetrievalError, match="VectorIndexRetriever failed") as info:
        engine.query(QUESTION)
    assert info.value.__cause__ is not None


def test_nest_llm_behind_a_stock_query_engine(chroma_dir, embed_model):
    """``NestLLM`` as the LLM of LlamaIndex's own engine: it decodes over the context the
    engine put in the prompt (its own retriever is never asked) and the spans reach
    ``Response.metadata``; called directly, it retrieves and returns them itself."""
    from llama_index.core.schema import QueryBundle

    from nest_integrations.llama_index import NestLLM

    index = VectorStoreIndex.from_vector_store(reopen_chroma(chroma_dir),
                                               embed_model=embed_model)
    own = index.as_retriever(similarity_top_k=2)
    asked = []
    original = own._retrieve
    own._retrieve = lambda bundle: asked.append(bundle) or original(bundle)  # count calls
    llm = NestLLM(retriever=own, max_new_tokens=16)
    stock = index.as_query_engine(llm=llm, similarity_top_k=2)
    res = stock.query(QUESTION)
    assert asked == []
    assert res.response.strip()
    assert res.source_nodes[0].node.ref_doc_id == "zephyr"
    # copied spans, or the focus sentence quoted whole (a matched span)
    assert res.metadata["nest_spans"] or (res.metadata["nest_quoted"]
                                          and res.metadata["nest_matches"])
    assert_spans_consistent(res)
    direct = llm.complete(QUESTION)
    assert [b.query_str for b in asked] == [QUESTION]
    assert isinstance(asked[0], QueryBundle)
    meta = direct.additional_kwargs
    assert meta["nest_spans"] or (meta["nest_quoted"] and meta["nest_matches"])
    for s in [*meta["nest_spans"], *meta["nest_matches"]]:
        assert direct.text[s["out_start"]:s["out_end"]] == s["cited_text"]


def test_a_question_the_store_does_not_answer_gets_the_abstention(chroma_dir, embed_model):
    engine = NestQueryEngine.from_vector_store(reopen_chroma(chroma_dir),
                                               embed_model=embed_model, similarity_top_k=3,
                                               max_new_tokens=MAX_NEW)
    res = engine.query("What is the capital of France?")
    assert res.response == "The documents do not say."
    assert res.metadata["nest_finish_reason"] == "abstained"
    assert res.metadata["nest_spans"] == []
