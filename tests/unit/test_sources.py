"""Passage sources on real stores (in-memory, FAISS on disk, embedded Chroma) with a tiny
deterministic embedding function: exact orders, clear errors for bad input."""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest

from nest_core.embeddings import EmbeddingDimensionError, HashingEmbeddings, embed_texts
from nest_core.sources import (
    ChromaSource,
    EmptyStoreError,
    FaissSource,
    FaissStore,
    InMemorySource,
    PassageSource,
)
from nest_core.sources.chroma import get_collection, http_client
from nest_core.sources.faiss_store import INDEX_FILE, META_FILE, SIDECAR_FILE
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
                       r"vectors, built with the embedding model 'minilm'.*--embedding minilm"):
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"chroma run --path <DIR> --host 127.0.0.1 "
                                              f"--port {port}"):
        http_client("127.0.0.1", port)


def test_public_names():
    import nest_core.sources as sources

    assert sorted(sources.__all__) == [
        "ChromaSource", "EmbeddingDimensionError", "EmptyStoreError", "FaissSource",
        "FaissStore", "InMemorySource", "LangChainFaissSource", "LlamaIndexFaissSource",
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
