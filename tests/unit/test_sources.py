"""Passage sources on real stores (in-memory, FAISS on disk, embedded Chroma) with a tiny
deterministic embedding function: exact orders, clear errors for bad input."""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
from conftest import free_port

from nest_core.stores.embeddings import EmbeddingDimensionError, HashingEmbeddings, embed_texts
from nest_core.stores.sources import (
    ChromaSource,
    EmptyStoreError,
    FaissSource,
    FaissStore,
    InMemorySource,
    PassageSource,
)
from nest_core.stores.sources.chroma import get_collection, http_client
from nest_core.stores.sources.faiss_store import INDEX_FILE, META_FILE, SIDECAR_FILE
from nest_core.types import Passage

EMBED = HashingEmbeddings(64)
PASSAGES = [
    Passage(id="zephyr", text="The Zephyr Widget Company was founded in 1987 in Ostrava.",
            title="Zephyr", metadata={"source": "zephyr.txt"}),
    Passage(id="compiler", text="A compiler translates source code into machine code."),
    Passage(id="stores", text="Chroma and FAISS store vectors for retrieval."),
    Passage(id="fox", text="The quick brown fox jumps over the lazy dog."),
]


def _unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _numbered(n: int) -> list[Passage]:
    return [Passage(id=f"p{i}", text=f"passage number {i}", title=f"T{i}") for i in range(n)]


def test_hashing_embeddings_are_deterministic_and_normalised():
    a, b = EMBED(["Hello world", "hello, WORLD!"]), HashingEmbeddings(64)(["Hello world"])
    assert a[0] == a[1] == b[0]
    assert np.linalg.norm(a[0]) == pytest.approx(1.0)
    assert EMBED([""]) == [[0.0] * 64]


def test_embed_texts_checks_shape_and_dimension():
    with pytest.raises(EmbeddingDimensionError,
                       match=r"the store holds 32-d vectors \(it does not record which "
                             r"embedding model built it\), but the embedding 'hashing-64' gives "
                             r"64-d vectors.*`--embedding NAME_OR_DIR`"):
        embed_texts(EMBED, ["x"], 32)
    with pytest.raises(EmbeddingDimensionError, match=r"the FAISS store at /s holds 32-d "
                       r"vectors, built with the embedding model 'minilm'.*Use 'minilm' "
                       r"\(its name or folder\): `--embedding NAME_OR_DIR`"):
        embed_texts(EMBED, ["x"], 32, store="the FAISS store at /s", recorded="minilm")
    with pytest.raises(ValueError, match="one vector per text"):
        embed_texts(lambda texts: [[1.0, 0.0]], ["a", "b"])


def test_in_memory_source_ranks_by_shared_words():
    source = InMemorySource(PASSAGES, embed=EMBED)
    assert isinstance(source, PassageSource)
    got = source.retrieve("who founded the Zephyr Widget Company", 2)
    assert got[0].id == "zephyr"
    assert got[0].score == pytest.approx(max(p.score for p in got))
    assert got[0].metadata["source"] == "zephyr.txt"
    assert len(source.retrieve("fox", 10)) == len(PASSAGES)


async def test_aretrieve_equals_retrieve():
    source = InMemorySource(PASSAGES, embed=EMBED)
    sync = source.retrieve("compiler machine code", 3)
    assert await source.aretrieve("compiler machine code", 3) == sync


def test_in_memory_bad_input(caplog):
    with caplog.at_level(logging.WARNING):
        source = InMemorySource([*PASSAGES, Passage(id="blank", text="  \n")], embed=EMBED)
    assert len(source) == len(PASSAGES)
    assert "no text" in caplog.text
    assert "blank" in caplog.text
    with pytest.raises(EmptyStoreError, match="add passages first"):
        InMemorySource(embed=EMBED).retrieve("anything", 1)
    with pytest.raises(ValueError, match="duplicate passage ids"):
        source.add([PASSAGES[0]])
    with pytest.raises(ValueError, match="positive integer"):
        source.retrieve("fox", 0)
    with pytest.raises(ValueError, match="non-empty str"):
        source.retrieve("   ", 3)


def test_in_memory_query_embedding_of_other_dimension_is_an_error():
    def switching(texts: list[str]) -> list[list[float]]:
        """Passages (a batch) in 64 dims, queries (one text) in 2: two models mixed up."""
        return EMBED(texts) if len(texts) > 1 else [[1.0, 0.0]]

    with pytest.raises(EmbeddingDimensionError, match=r"holds 64-d vectors.*gives 2-d vectors"):
        InMemorySource(PASSAGES, embed=switching).retrieve("fox", 1)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_store_finds_each_vector_after_reopen(tmp_path, kind):
    n, dim = 200, 16
    vectors = _unit_vectors(n, dim)
    store = FaissStore.create(tmp_path, dim, kind=kind, nlist=4 if kind == "ivf" else None)
    assert store.add(_numbered(n), vectors) == n
    store.meta.nprobe = 4  # search every IVF cell: exact
    store.save()
    reopened = FaissStore.open(tmp_path)
    assert len(reopened) == n
    assert reopened.meta.kind == kind
    hits = reopened.search(vectors[:20], 3)
    assert [h[0].id for h in hits] == [f"p{i}" for i in range(20)]
    assert hits[5][0].text == "passage number 5"
    assert hits[5][0].title == "T5"
    assert hits[5][0].score == pytest.approx(1.0, abs=1e-5)


def test_faiss_sidecar_is_plain_json_lines(tmp_path):
    store = FaissStore.create(tmp_path, 64, embedding=EMBED.name)
    store.add(PASSAGES, np.asarray(EMBED([p.text for p in PASSAGES])))
    store.save()
    lines = (tmp_path / SIDECAR_FILE).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [p.id for p in PASSAGES]
    assert json.loads(lines[0])["metadata"] == {"source": "zephyr.txt"}
    header = json.loads((tmp_path / META_FILE).read_text())
    assert (header["dim"], header["rows"], header["embedding"]) == (64, 4, "hashing-64")


def test_faiss_readd_is_idempotent_and_changed_text_replaces(tmp_path):
    store = FaissStore.create(tmp_path, 16)
    vectors = _unit_vectors(5, 16)
    assert store.add(_numbered(5), vectors) == 5
    assert store.add(_numbered(5), vectors) == 0
    changed = Passage(id="p2", text="a new text for two", title="T2")
    assert store.add([changed], vectors[2:3]) == 1
    assert len(store) == 5
    hit = store.search(vectors[2:3], 1)[0][0]
    assert (hit.id, hit.text) == ("p2", "a new text for two")
    assert [p.id for p in store.search(vectors[2:3], 5)[0]].count("p2") == 1
    assert store.delete(["p0", "nope"]) == 1
    store.save()
    reopened = FaissStore.open(tmp_path)
    assert reopened.ids() == ["p1", "p3", "p4", "p2"]
    assert len(reopened.search(vectors[:1], 10)[0]) == 4


def test_faiss_missing_sidecar_entries_are_an_error(tmp_path):
    store = FaissStore.create(tmp_path, 16)
    store.add(_numbered(6), _unit_vectors(6, 16))
    store.save()
    lines = (tmp_path / SIDECAR_FILE).read_text().splitlines(keepends=True)
    (tmp_path / SIDECAR_FILE).write_text("".join(lines[:4]))
    with pytest.raises(ValueError, match=r"lacks entries for 2 index id\(s\) \(first: \[4, 5\]\)"):
        FaissStore.open(tmp_path)
    (tmp_path / SIDECAR_FILE).unlink()
    with pytest.raises(ValueError, match="Rebuild the store"):
        FaissStore.open(tmp_path)


def test_faiss_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"FaissStore\.create"):
        FaissStore.open(tmp_path / "nothing")
    store = FaissStore.create(tmp_path, 16)
    with pytest.raises(EmptyStoreError, match="ingest documents first"):
        store.search(_unit_vectors(1, 16), 3)
    with pytest.raises(ValueError, match="does not match the store's dimension 16"):
        store.add(_numbered(2), _unit_vectors(2, 8))
    store.add(_numbered(2), _unit_vectors(2, 16))
    with pytest.raises(ValueError, match="do not match the store's dimension 16"):
        store.search(_unit_vectors(1, 8), 1)
    with pytest.raises(ValueError, match="duplicate passage ids"):
        store.add([*_numbered(1), *_numbered(1)], _unit_vectors(2, 16))
    store.save()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        FaissStore.create(tmp_path, 16)
    with pytest.raises(ValueError, match="IVF needs at least"):
        FaissStore.create(tmp_path / "ivf", 16, kind="ivf", nlist=10).add(
            _numbered(3), _unit_vectors(3, 16))
    assert (tmp_path / INDEX_FILE).is_file()
    with pytest.raises(EmbeddingDimensionError, match=f"the FAISS store at {tmp_path} holds "
                       f"16-d vectors .*gives 64-d vectors"):
        FaissSource(FaissStore.open(tmp_path), embed=EMBED).retrieve("fox", 1)


def test_faiss_source_retrieves_and_warns_on_other_embedding(tmp_path, caplog):
    store = FaissStore.create(tmp_path, 64, kind="hnsw", embedding="some-other-model")
    store.add(PASSAGES, np.asarray(EMBED([p.text for p in PASSAGES])))
    with caplog.at_level(logging.WARNING):
        source = FaissSource(store, embed=EMBED)
    assert "'some-other-model' but is queried with 'hashing-64'" in caplog.text
    assert source.retrieve("quick brown fox lazy dog", 1)[0].id == "fox"


@pytest.fixture
def chroma_client():
    chromadb = pytest.importorskip("chromadb")
    return chromadb.EphemeralClient()


def _chroma_collection(client, name: str, passages=PASSAGES):
    col = get_collection(client, name, create=True, embed=EMBED, dim=64)
    col.add(ids=[p.id for p in passages], embeddings=EMBED([p.text for p in passages]),
            documents=[p.text for p in passages],
            metadatas=[{**p.metadata, "title": p.title or "", "_node_content": "{}"}
                       for p in passages])
    return col


def test_chroma_source_strips_private_metadata(chroma_client):
    source = ChromaSource(_chroma_collection(chroma_client, "unit-strip"), embed=EMBED)
    got = source.retrieve("Zephyr Widget Company founded", 2)
    assert got[0].id == "zephyr"
    assert got[0].title == "Zephyr"
    assert got[0].metadata == {"source": "zephyr.txt", "title": "Zephyr"}
    assert got[0].score == pytest.approx(min(p.score for p in got))  # a distance
    assert got[1].title is None
    assert len(source) == len(PASSAGES)


def test_chroma_k_past_the_store_size_returns_the_whole_store(chroma_client):
    # caught: k passed to Chroma as is ("out of range integral type conversion attempted")
    source = ChromaSource(_chroma_collection(chroma_client, "unit-huge-k"), embed=EMBED)
    assert len(source.retrieve("fox", 10**12)) == len(PASSAGES)


def test_chroma_bad_input(chroma_client):
    empty = get_collection(chroma_client, "unit-empty", create=True, embed=EMBED, dim=64)
    with pytest.raises(EmptyStoreError, match="is empty; ingest documents first"):
        ChromaSource(empty, embed=EMBED).retrieve("anything", 3)
    with pytest.raises(EmptyStoreError, match="does not exist"):
        get_collection(chroma_client, "unit-missing")
    full = _chroma_collection(chroma_client, "unit-dim")
    with pytest.raises(EmbeddingDimensionError, match="Chroma collection 'unit-dim' holds "
                       "64-d vectors, built with the embedding model 'hashing-64', but the "
                       "embedding 'hashing-32' gives 32-d vectors"):
        ChromaSource(full, embed=HashingEmbeddings(32)).retrieve("fox", 1)
    untagged = chroma_client.create_collection("unit-untagged", embedding_function=None)
    untagged.add(ids=["a"], embeddings=[[1.0, 0.0, 0.0]], documents=["abc"])
    # a collection nest did not write records no dimension: it is read from a stored vector
    with pytest.raises(EmbeddingDimensionError, match=r"'unit-untagged' holds 3-d vectors \(it "
                       r"does not record which embedding model built it\), but the embedding "
                       r"'hashing-64' gives 64-d vectors"):
        ChromaSource(untagged, embed=EMBED).retrieve("fox", 1)


def test_chroma_server_not_running_names_the_command():
    pytest.importorskip("chromadb")
    port = free_port()
    with pytest.raises(ConnectionError, match=f"chroma run --path <DIR> --host 127.0.0.1 "
                                              f"--port {port}"):
        http_client("127.0.0.1", port)


def test_public_names():
    import nest_core.stores.sources as sources

    assert sorted(sources.__all__) == [
        "ChromaSource", "EmbeddingDimensionError", "EmptyStoreError", "FaissSource",
        "FaissStore", "InMemorySource", "LangChainFaissSource", "LlamaIndexSource",
        "PassageSource", "SyncPassageSource", "UnsafeStoreError", "detect_store_kind",
        "open_store", "span_datastore_dir"]
    assert all(hasattr(sources, name) for name in sources.__all__)


def test_a_frozen_chroma_server_times_out_with_a_clear_error():
    # caught: chromadb's HttpClient waiting for ever (issue 14, case 8). A real loopback
    # server that accepts connections and never answers, as a frozen `chroma run` does.
    import socket
    import threading
    import time

    pytest.importorskip("chromadb")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer within 1 s"):
            ChromaSource.from_server("127.0.0.1", port, "served", embed=EMBED, timeout=1.0)
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        for conn in held:
            conn.close()
        listener.close()


# --- stores LangChain and LlamaIndex wrote, built with their own classes -----------------------
def langchain_hashing():
    """A LangChain ``Embeddings`` giving :data:`EMBED`'s vectors."""
    from langchain_core.embeddings import Embeddings

    class Hashing(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            return EMBED(texts)

        def embed_query(self, text: str) -> list[float]:
            return EMBED([text])[0]

    return Hashing()


def llama_hashing():
    """A LlamaIndex embedding model giving :data:`EMBED`'s vectors."""
    pytest.importorskip("llama_index.core")
    from llama_index.core.embeddings import BaseEmbedding

    class Hashing(BaseEmbedding):
        def _get_query_embedding(self, query: str) -> list[float]:
            return EMBED([query])[0]

        def _get_text_embedding(self, text: str) -> list[float]:
            return EMBED([text])[0]

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return EMBED([query])[0]

    return Hashing()


def llama_nodes(passages=PASSAGES):
    """LlamaIndex nodes of ``passages`` (same ids; only the text is embedded)."""
    from llama_index.core.schema import TextNode

    return [TextNode(id_=p.id, text=p.text, metadata={**p.metadata, "title": p.title or ""},
                     excluded_embed_metadata_keys=["source", "title"]) for p in passages]


def llama_index_faiss_dir(path):
    """``VectorStoreIndex`` over ``FaissVectorStore`` (inner product), persisted to ``path``;
    node ids are the passage ids."""
    pytest.importorskip("llama_index.vector_stores.faiss")
    import faiss
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.vector_stores.faiss import FaissVectorStore

    context = StorageContext.from_defaults(
        vector_store=FaissVectorStore(faiss_index=faiss.IndexFlatIP(64)))
    VectorStoreIndex(llama_nodes(), storage_context=context, embed_model=llama_hashing())
    context.persist(persist_dir=str(path))
    return path


def test_a_llamaindex_faiss_persist_dir_opens_without_pickle(tmp_path):
    from nest_core.stores.sources import LlamaIndexSource, detect_store_kind, open_store

    path = llama_index_faiss_dir(tmp_path / "llama")
    assert detect_store_kind(path) == "llama-index"
    source = open_store(path, embed=EMBED)
    assert isinstance(source, LlamaIndexSource)
    hits = source.retrieve("Zephyr Widget Company founded Ostrava", 2)
    assert hits[0].id == "zephyr"
    assert hits[0].text == PASSAGES[0].text
    assert hits[0].title == "Zephyr"
    assert hits[0].metadata["source"] == "zephyr.txt"
    assert hits[0].score == pytest.approx(max(h.score for h in hits))  # inner product
    assert [p.id for p in source.passages()] == [p.id for p in PASSAGES]
    assert source.retrieve("quick brown fox lazy dog", 10)[0].id == "fox"
    assert len(source.retrieve("fox", 10)) == len(PASSAGES)
    with pytest.raises(EmbeddingDimensionError, match=f"the LlamaIndex FAISS store at {path} "
                       f"holds 64-d vectors .*'hashing-32' gives 32-d"):
        open_store(path, embed=HashingEmbeddings(32)).retrieve("fox", 1)


def test_a_llamaindex_default_simple_vector_store_opens_too(tmp_path):
    """``VectorStoreIndex(nodes)`` with no vector store given: JSON vectors, cosine."""
    from llama_index.core import VectorStoreIndex

    from nest_core.stores.sources import open_store

    index = VectorStoreIndex(llama_nodes(), embed_model=llama_hashing())
    index.storage_context.persist(persist_dir=str(tmp_path))
    source = open_store(tmp_path, embed=lambda texts: [[2 * v for v in vec]
                                                       for vec in EMBED(texts)])
    hits = source.retrieve("Zephyr Widget Company founded Ostrava", 4)
    assert [h.id for h in hits][:1] == ["zephyr"]
    assert hits[0].score == pytest.approx(np.dot(  # cosine: the doubled query is normalised
        EMBED(["Zephyr Widget Company founded Ostrava"])[0], EMBED([PASSAGES[0].text])[0]))
    assert source.where == f"the LlamaIndex SimpleVectorStore store at {tmp_path}"
    assert {p.id for p in source.passages()} == {p.id for p in PASSAGES}


def test_a_llamaindex_dir_with_bad_vectors_or_missing_files_is_named(tmp_path):
    from nest_core.stores.sources import LlamaIndexSource

    path = llama_index_faiss_dir(tmp_path / "llama")
    (path / "default__vector_store.json").write_text('{"embedding_dict": {}}')
    with pytest.raises(EmptyStoreError, match="holds no vectors"):
        LlamaIndexSource.from_persist_dir(path, embed=EMBED)
    (path / "default__vector_store.json").write_text('{"vectors": []}')
    with pytest.raises(ValueError, match="neither a FAISS index nor a LlamaIndex SimpleVector"):
        LlamaIndexSource.from_persist_dir(path, embed=EMBED)
    (path / "docstore.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing docstore\.json.*persist\(persist_dir"):
        LlamaIndexSource.from_persist_dir(path, embed=EMBED)


class _TouchOnLoad:
    """Unpickling this creates ``marker``: the proof that a pickle was (or was not) run."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_a_langchain_save_local_pickle_is_never_loaded_without_the_opt_in(tmp_path):
    import pickle

    import faiss

    from nest_core.stores.sources import LangChainFaissSource, UnsafeStoreError, open_store

    path, marker = tmp_path / "lc", tmp_path / "ran"
    path.mkdir()
    faiss.write_index(faiss.IndexFlatL2(64), str(path / "index.faiss"))
    (path / "index.pkl").write_bytes(pickle.dumps(_TouchOnLoad(marker)))
    for opener in (lambda: open_store(path, embed=EMBED),
                   lambda: LangChainFaissSource.from_path(path, embed=EMBED,
                                                          allow_dangerous_deserialization=1)):
        with pytest.raises(UnsafeStoreError, match=r"index\.pkl is a Python pickle .*"
                           r"--allow-dangerous-deserialization on the command line, "
                           r"allow_dangerous_deserialization=True in Python"):
            opener()
    assert not marker.exists()
    # the opt-in means what it says: the file's code runs (here it only touches a file)
    with pytest.raises(ValueError, match="does not hold LangChain's"):
        open_store(path, embed=EMBED, allow_dangerous_deserialization=True)
    assert marker.exists()


def test_a_langchain_save_local_dir_opens_with_the_opt_in(tmp_path):
    pytest.importorskip("langchain_community")
    from langchain_community.vectorstores import FAISS

    from nest_core.stores.sources import LangChainFaissSource, detect_store_kind, open_store

    FAISS.from_texts([p.text for p in PASSAGES], langchain_hashing(),
                     metadatas=[dict(p.metadata) for p in PASSAGES],
                     ids=[p.id for p in PASSAGES]).save_local(str(tmp_path))
    assert detect_store_kind(tmp_path) == "langchain-faiss"
    source = open_store(tmp_path, embed=EMBED, allow_dangerous_deserialization=True)
    assert isinstance(source, LangChainFaissSource)
    hits = source.retrieve("Zephyr Widget Company founded Ostrava", 4)
    assert hits[0].id == "zephyr"
    assert hits[0].metadata == {"source": "zephyr.txt"}
    assert hits[0].score == pytest.approx(min(h.score for h in hits))  # squared L2
    assert {p.id for p in source.passages()} == {p.id for p in PASSAGES}


def test_chroma_collection_is_chosen_by_name_or_as_the_only_one(tmp_path):
    from nest_core.stores.sources.chroma import choose_collection, persistent_client

    client = persistent_client(tmp_path)
    with pytest.raises(EmptyStoreError, match="holds no Chroma collections"):
        choose_collection(client, None, "DIR")
    _chroma_collection(client, "langchain")
    assert choose_collection(client, None, "DIR") == (
        "langchain", "using the only Chroma collection in DIR: 'langchain'")
    source = ChromaSource.from_path(tmp_path, embed=EMBED)
    assert source.collection.name == "langchain"
    assert source.note == f"using the only Chroma collection in {tmp_path}: 'langchain'"
    assert {p.id for p in source.passages(page=3)} == {p.id for p in PASSAGES}  # two pages
    _chroma_collection(client, "docs")
    with pytest.raises(EmptyStoreError, match=r"DIR holds 2 Chroma collections \['docs', "
                       r"'langchain'\]; name one with --collection NAME"):
        choose_collection(client, None, "DIR")
    with pytest.raises(EmptyStoreError, match=r"'manual' does not exist \(collections: \['docs',"
                       r" 'langchain'\]\); name one of those"):
        ChromaSource.from_path(tmp_path, "manual", embed=EMBED)
    _chroma_collection(client, "nest")
    assert choose_collection(client, None, "DIR") == ("nest", None)


def test_span_datastore_lives_inside_a_writable_store_else_in_the_user_cache(tmp_path):
    import os

    from nest_core.stores.datastore import default_datastore_dir
    from nest_core.stores.sources import span_datastore_dir

    assert span_datastore_dir(tmp_path) == tmp_path / "nest_spans"
    shared = tmp_path / "shared"
    (shared / "nest_spans").mkdir(parents=True)
    shared.chmod(0o555)
    try:
        assert span_datastore_dir(shared) == shared / "nest_spans"  # one was shipped with it
        (shared / "nest_spans").chmod(0o555)
        bare = tmp_path / "bare"
        bare.mkdir()
        bare.chmod(0o555)
        if os.access(bare, os.W_OK):
            pytest.skip("root may write anywhere: the read-only case needs a normal user")
        assert span_datastore_dir(bare) == default_datastore_dir()
    finally:
        shared.chmod(0o755)


def test_load_embedding_finds_models_locally_or_names_the_fix(tmp_path):
    from nest_core.stores.embeddings import default_embedding_function, load_embedding

    assert load_embedding(None) is default_embedding_function()
    assert load_embedding("all-MiniLM-L6-v2") is default_embedding_function()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no sentence-transformers model"):
        load_embedding(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing: no such folder; pass the folder"):
        load_embedding(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        load_embedding(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no model of that name is in the local "
                       "Hugging Face cache"):
        load_embedding("nest-unit-tests/no-such-model")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "modules.json").write_text("[]")
    assert load_embedding(tmp_path / "model").name == "model"  # loads on its first call
