"""Real stores with the real bundled MiniLM: embedded Chroma on disk, FAISS on disk, and a
Chroma server started with ``chroma run`` and queried through ``HttpClient``, then decoded
with SmolLM2 over a warm span datastore."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import free_port

from nest_core.stores.datastore import SpanDatastore
from nest_core.stores.ingest import Document, ingest, open_chroma_collection, open_faiss_store
from nest_core.stores.sources import ChromaSource, FaissSource, FaissStore

pytestmark = pytest.mark.integration

DOCS = [
    Document(title="FOLDOC", text="The Free On-line Dictionary of Computing (FOLDOC) is a "
             "searchable dictionary of acronyms, jargon, programming languages, tools, "
             "architecture, operating systems and networking, started by Denis Howe in 1985."),
    Document(title="compiler", text="A compiler is a program that translates a high-level "
             "language program into a functionally equivalent low-level language program, "
             "usually machine code, so that it can be executed by a computer."),
    Document(title="banana", text="The banana is an elongated, edible fruit produced by "
             "several kinds of large herbaceous flowering plants in the genus Musa."),
    Document(title="Ostrava", text="Ostrava is a city in the north-east of the Czech Republic "
             "and the capital of the Moravian-Silesian Region, known for coal mining."),
]


@pytest.fixture(scope="module")
def minilm():
    from nest_core.stores.embeddings import default_embedding_function

    embed = default_embedding_function()
    assert embed.dimension == 384
    return embed


def test_embedded_chroma_on_disk_finds_by_meaning(tmp_path, minilm):
    col = open_chroma_collection(tmp_path, name="foldoc", embed=minilm)
    report = ingest(DOCS, col, embed=minilm, progress=False)
    assert report.written == len(DOCS)
    source = ChromaSource.from_path(tmp_path, "foldoc", embed=minilm)
    hits = source.retrieve("Who started the online computing dictionary?", 2)
    assert hits[0].title == "FOLDOC"
    assert source.retrieve("tropical fruit", 1)[0].title == "banana"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_on_disk_finds_by_meaning(tmp_path, minilm, kind):
    store = open_faiss_store(tmp_path, embed=minilm, kind=kind, nlist=2)
    ingest(DOCS, store, embed=minilm, progress=False)
    source = FaissSource.from_path(tmp_path, embed=minilm)
    assert source.store.meta.kind == kind
    source.store.meta.nprobe = 2
    assert source.retrieve("program that turns source code into machine code", 1)[0].title \
        == "compiler"
    assert source.retrieve("a city in Czechia", 1)[0].title == "Ostrava"


def test_chroma_server_ingest_retrieve_and_decode(chroma_server, minilm, smollm, tmp_path):
    from nest_core.config import NestConfig
    from nest_core.decoder import NestDecoder

    host, port, _, _ = chroma_server
    col = open_chroma_collection(host=host, port=port, name="served", embed=minilm)
    datastore = SpanDatastore(tmp_path / "spans")
    report = ingest(DOCS, col, embed=minilm, progress=False, lm=smollm, datastore=datastore)
    assert report.written == len(DOCS)
    assert len(datastore) == len(DOCS)
    assert ingest(DOCS, col, embed=minilm, progress=False).written == 0

    source = ChromaSource.from_server(host, port, "served", embed=minilm)
    passages = source.retrieve("What is FOLDOC?", 2)
    assert passages[0].title == "FOLDOC"

    warm = SpanDatastore(tmp_path / "spans")  # a fresh process: disk only
    decoder = NestDecoder(smollm, NestConfig(), key_cache=warm)
    result = decoder.generate("What is FOLDOC?", passages, max_new_tokens=32)
    assert warm.stats.disk_hits == len(passages)
    assert warm.stats.misses == 0
    assert result.token_ids
    for span in result.spans:
        assert span.passage.text[span.src_start:span.src_end] == span.text
        assert result.text[span.out_start:span.out_end] == span.text


def test_server_not_running_is_a_clear_error():
    with pytest.raises(ConnectionError, match="chroma run --path"):
        ChromaSource.from_server("127.0.0.1", free_port(), "served")


def test_faiss_store_reopens_without_embedding_model(tmp_path, minilm):
    store = open_faiss_store(tmp_path, embed=minilm)
    ingest(DOCS[:2], store, embed=minilm, progress=False)
    reopened = FaissStore.open(tmp_path)
    assert reopened.meta.embedding == "all-MiniLM-L6-v2"
    assert reopened.dim == 384
    assert len(reopened) == 2


def test_the_default_embedder_keeps_recent_vectors_and_gives_them_back_unchanged() -> None:
    """Small calls (a question, the passages whose relevance decides abstention) reuse the
    vectors of texts seen before: the same numbers as the first call, no model call."""
    from nest_core.stores.embeddings import SentenceTransformerEmbeddings

    embed = SentenceTransformerEmbeddings(cache_texts=3)
    texts = ["Orchard robots pick apples.", "Blossom Week is in May.", "Badges are green."]
    first = embed(texts)
    model_calls = []
    real_encode = embed._encode
    embed._encode = lambda new: model_calls.append(new) or real_encode(new)  # type: ignore[method-assign]
    again = embed([texts[1], "What colour are badges?", texts[1]])
    assert model_calls == [["What colour are badges?"]]  # only the new text, once
    assert again[0] == first[1]
    assert again[2] == first[1]
    fresh = SentenceTransformerEmbeddings(cache_texts=0)([texts[1]])[0]
    assert np.allclose(again[0], fresh, atol=1e-5)
    embed(["Another text entirely."])  # the least recently used (texts[0], texts[2]) go
    assert set(embed._cache) == {texts[1], "What colour are badges?", "Another text entirely."}
    many = [f"text {i}" for i in range(embed.batch_size + 1)]  # indexing: not kept
    assert len(embed(many)) == len(many)
    assert not set(many) & set(embed._cache)
