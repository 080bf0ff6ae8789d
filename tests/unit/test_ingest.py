"""Ingest: exact chunk offsets, idempotent re-ingest into FAISS and Chroma, datastore
precompute that leaves the decoder nothing to encode."""

from __future__ import annotations

import logging
import re

import pytest

from nest_core.config import NestConfig
from nest_core.stores.datastore import SpanDatastore
from nest_core.stores.embeddings import EmbeddingDimensionError, HashingEmbeddings
from nest_core.stores.ingest import (
    Document,
    chunk_document,
    ingest,
    open_chroma_collection,
    open_faiss_store,
)
from nest_core.stores.sources import ChromaSource, FaissSource, FaissStore

EMBED = HashingEmbeddings(64)
SENTENCE = "Word{i} is a term in the glossary of computing and it has a meaning."  # 14 words
LONG_TEXT = " ".join(SENTENCE.format(i=i) for i in range(30))  # 420 words, 30 sentences
DOCS = [
    Document(text=LONG_TEXT, title="Glossary", metadata={"source": "foldoc", "tags": ["a"]}),
    Document(text="The Zephyr Widget Company was founded in 1987 in Ostrava.", title="Zephyr"),
    Document(text="A compiler translates source code into machine code.", id="compiler"),
]


def test_chunks_are_exact_slices_with_offsets_and_stable_ids():
    doc = DOCS[0]
    passages = chunk_document(doc, words_per_passage=100)
    assert [p.id for p in passages] == [f"{doc.doc_id}#{i}" for i in range(len(passages))]
    for p in passages:
        assert p.text == doc.text[p.metadata["start"]:p.metadata["end"]]
        assert p.title == "Glossary" == p.metadata["title"]
        assert p.metadata["doc_id"] == doc.doc_id
        assert p.metadata["source"] == "foldoc"
        assert p.metadata["tags"] == '["a"]'  # vector stores keep scalars only
        assert p.text.endswith("meaning.")  # cut at a sentence end near 100 words
        assert 75 <= len(p.text.split()) <= 125
    # Every word of the document lands in exactly one passage, in order.
    assert [w for p in passages for w in p.text.split()] == doc.text.split()
    assert chunk_document(doc, 100) == passages


def test_chunking_edge_cases():
    assert chunk_document(Document(text="   \n  ", title="Blank")) == []
    one = chunk_document(Document(text="  just four words here  "))
    assert [(p.text, p.metadata["start"], p.metadata["end"]) for p in one] == \
        [("just four words here", 2, 22)]
    words = " ".join(f"w{i}" for i in range(250))  # no sentence ends: hard cuts at 100
    assert [len(p.text.split()) for p in chunk_document(Document(text=words))] == [100, 100, 50]
    with pytest.raises(ValueError, match="must be positive"):
        chunk_document(Document(text="x"), 0)
    assert Document(text="a", title="T").doc_id == Document(text="b", title="T").doc_id


def test_faiss_ingest_is_idempotent_and_replaces_changed_documents(tmp_path, caplog):
    store = open_faiss_store(tmp_path, embed=EMBED)
    with caplog.at_level(logging.WARNING):
        report = ingest([*DOCS, Document(text="  ", title="Empty")], store, embed=EMBED,
                        progress=False)
    assert "no text" in caplog.text
    n = len(chunk_document(DOCS[0])) + 2
    assert (report.passages, report.written, report.unchanged, report.empty_skipped) == \
        (n, n, 0, 1)
    again = ingest(DOCS, FaissStore.open(tmp_path), embed=EMBED, progress=False)
    assert (again.written, again.unchanged, again.removed) == (0, n, 0)

    shorter = Document(text=" ".join(SENTENCE.format(i=i) for i in range(100, 108)),
                       title="Glossary", metadata={"source": "foldoc"})
    store = FaissStore.open(tmp_path)
    changed = ingest([shorter], store, embed=EMBED, progress=False)
    assert (changed.written, changed.removed) == (1, n - 3)
    reopened = FaissStore.open(tmp_path)
    assert len(reopened) == 3
    hit = FaissSource(reopened, embed=EMBED).retrieve("Word103 glossary term", 1)[0]
    assert hit.id == f"{shorter.doc_id}#0"
    assert hit.text == shorter.text
    assert reopened.meta.embedding == "hashing-64"


def test_chroma_ingest_is_idempotent(tmp_path):
    col = open_chroma_collection(tmp_path / "chroma", name="ingest-test", embed=EMBED)
    first = ingest(DOCS, col, embed=EMBED, progress=False)
    second = ingest(DOCS, ChromaSource(col, embed=EMBED), embed=EMBED, progress=False)
    assert first.written == first.passages == col.count()
    assert (second.written, second.unchanged) == (0, first.passages)
    source = ChromaSource.from_path(tmp_path / "chroma", "ingest-test", embed=EMBED)
    hit = source.retrieve("Zephyr Widget Company founded", 1)[0]
    assert (hit.id, hit.title) == (f"{DOCS[1].doc_id}#0", "Zephyr")
    assert (hit.metadata["start"], hit.metadata["end"]) == (0, len(DOCS[1].text))


def test_ingest_bad_input(tmp_path):
    store = open_faiss_store(tmp_path, embed=EMBED)
    with pytest.raises(ValueError, match=r"holds 64-d vectors.*'hashing-32' gives 32-d vectors"):
        ingest(DOCS[1:], store, embed=HashingEmbeddings(32), progress=False)
    with pytest.raises(ValueError, match=re.escape("give documents distinct ids or titles")):
        ingest([DOCS[1], DOCS[1]], store, embed=EMBED, progress=False)
    with pytest.raises(TypeError, match="FaissStore, a ChromaSource or a chromadb collection"):
        ingest(DOCS, object(), embed=EMBED, progress=False)
    with pytest.raises(ValueError, match="exactly one of path="):
        open_chroma_collection(embed=EMBED)
    store.save()
    with pytest.raises(EmbeddingDimensionError, match=f"the FAISS store at {tmp_path} holds "
                       f"64-d vectors, built with the embedding model 'hashing-64', but the "
                       f"embedding 'hashing-16' gives 16-d vectors"):
        open_faiss_store(tmp_path, embed=HashingEmbeddings(16))


def test_precompute_fills_the_datastore_the_decoder_reads(tiny_lm, tmp_path):
    from nest_core.decoder import NestDecoder

    config = NestConfig(max_passage_tokens=64)
    store = open_faiss_store(tmp_path, embed=EMBED)
    report = ingest(DOCS[1:], store, embed=EMBED, progress=False, lm=tiny_lm, config=config)
    datastore = SpanDatastore.for_store(tmp_path)
    assert len(datastore) == 2
    assert report.encoded_rows > 0

    calls = []
    handle = tiny_lm.model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        decoder = NestDecoder(tiny_lm, config, key_cache=SpanDatastore.for_store(tmp_path))
        passages = FaissSource(FaissStore.open(tmp_path), embed=EMBED).retrieve("Zephyr", 2)
        assert decoder.prepare(passages) == report.encoded_rows
    finally:
        handle.remove()
    assert calls == []  # every passage came from disk: the LM ran on none of them


@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_a_deleted_file_of_a_folder_indexed_whole_is_removed(tmp_path, kind):
    # caught: a deleted file's passages kept ("0 removed"; issue 14, case 3)
    docs = [Document(text=LONG_TEXT, id="notes/a.md"),
            Document(text="Gone tomorrow.", id="notes/b.md"),
            Document(text="Elsewhere.", id="other/c.md")]

    def store():
        return (open_faiss_store(tmp_path / "s", embed=EMBED) if kind == "faiss"
                else open_chroma_collection(tmp_path / "s", embed=EMBED))

    ingest(docs, store(), embed=EMBED, progress=False)
    kept = ingest(docs[:1], store(), embed=EMBED, progress=False)
    assert kept.removed == 0  # without a folder, absence means nothing
    report = ingest(docs[:1], store(), embed=EMBED, progress=False,
                    complete_prefixes=["notes/"])
    assert report.removed == 1
    source = (FaissSource(FaissStore.open(tmp_path / "s"), embed=EMBED) if kind == "faiss"
              else ChromaSource(store(), embed=EMBED))
    ids = {p.id for p in source.retrieve("term glossary gone elsewhere", 50)}
    assert "notes/b.md#0" not in ids
    assert {"other/c.md#0", "notes/a.md#0"} <= ids


@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_another_embedding_of_the_same_dimension_is_refused(tmp_path, kind):
    # caught: vectors of two models mixed silently (issue 14, case 4)
    other = HashingEmbeddings(64)
    other.name = "another-model"  # another model, the same 64 dimensions

    def store():
        return (open_faiss_store(tmp_path / "s", embed=EMBED) if kind == "faiss"
                else open_chroma_collection(tmp_path / "s", embed=EMBED))

    ingest(DOCS[1:], store(), embed=EMBED, progress=False)
    with pytest.raises(ValueError, match="built with the embedding"):
        ingest(DOCS[:1], store(), embed=other, progress=False)
    assert ingest(DOCS[:1], store(), embed=EMBED, progress=False).written > 0


def test_precompute_source_covers_a_store_nest_did_not_write(tiny_lm, tmp_path):
    """A Chroma collection written with chromadb directly (LangChain's layout: ids, vectors,
    ``documents``, metadata with ``source``), no nest metadata: after precompute_source the
    decoder encodes none of its passages."""
    from nest_core.decoder import NestDecoder
    from nest_core.stores.ingest import precompute_source
    from nest_core.stores.sources import open_store
    from nest_core.stores.sources.chroma import persistent_client

    texts = [d.text for d in DOCS]
    persistent_client(tmp_path).create_collection("langchain", embedding_function=None).add(
        ids=["a", "b", "c"], embeddings=EMBED(texts), documents=texts,
        metadatas=[{"source": f"{i}.txt", "start_index": 0} for i in range(3)])
    config = NestConfig(max_passage_tokens=64)
    source = open_store(tmp_path, embed=EMBED)
    datastore = SpanDatastore(tmp_path / "nest_spans")
    passages, rows = precompute_source(source, tiny_lm, datastore=datastore, config=config,
                                       progress=False)
    assert passages == len(datastore) == 3
    calls = []
    handle = tiny_lm.model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        decoder = NestDecoder(tiny_lm, config, key_cache=SpanDatastore(tmp_path / "nest_spans"))
        assert decoder.prepare(source.retrieve("Zephyr Widget Company", 3)) == rows
    finally:
        handle.remove()
    assert calls == []  # every passage came from disk: the LM ran on none of them
    with pytest.raises(TypeError, match="cannot list its passages"):
        precompute_source(object(), tiny_lm, datastore=datastore)


class InterruptAfter(HashingEmbeddings):
    """The real hashing embedding, interrupted (as by Ctrl-C) on its call number ``calls``;
    ``on_interrupt`` looks at the store on disk at that moment."""

    def __init__(self, dim: int, calls: int, on_interrupt=lambda: None) -> None:
        super().__init__(dim)
        self.calls, self.on_interrupt = calls, on_interrupt

    def __call__(self, texts):
        self.calls -= 1
        if self.calls == 0:
            self.on_interrupt()
            raise KeyboardInterrupt
        return super().__call__(texts)


@pytest.mark.parametrize("kind", ["faiss", "chroma"])
def test_an_interrupted_ingest_is_marked_and_the_same_call_resumes(tmp_path, kind,
                                                                   monkeypatch):
    # caught: Ctrl-C left a half-updated store with no marker; FAISS saved only at the end,
    # so a killed run lost everything (issue 14, cases 7 and 11)
    import nest_core.stores.ingest as ingest_module
    from nest_core.stores.ingest import unfinished

    monkeypatch.setattr(ingest_module, "CHECKPOINT_SECONDS", 0.0)  # save after every batch
    docs = [Document(text=SENTENCE.format(i=i), id=f"notes/{i}.md") for i in range(10)]
    ids = sorted(f"notes/{i}.md#0" for i in range(10))

    def store():
        return (open_faiss_store(tmp_path / "s", embed=EMBED) if kind == "faiss"
                else open_chroma_collection(tmp_path / "s", embed=EMBED))

    def source():
        return (FaissSource(FaissStore.open(tmp_path / "s"), embed=EMBED) if kind == "faiss"
                else ChromaSource(store(), embed=EMBED))

    on_disk = []
    interrupting = InterruptAfter(64, calls=3,
                                  on_interrupt=lambda: on_disk.append(len(source().passages())))
    with pytest.raises(KeyboardInterrupt):
        ingest(docs, store(), embed=interrupting, batch_size=4, progress=False)
    assert on_disk == [8]  # two batches were durable before the interrupt, not only after
    assert unfinished(source()) == {"started": unfinished(source())["started"], "passages": 10}
    assert len(source().passages()) == 8
    report = ingest(docs, store(), embed=EMBED, batch_size=4, progress=False)
    assert (report.unchanged, report.written) == (8, 2)
    assert unfinished(source()) is None
    assert sorted(p.id for p in source().passages()) == ids


def test_a_large_ingest_says_how_long_it_will_take_before_the_work_is_done(tiny_lm, tmp_path,
                                                                          monkeypatch, capsys):
    # caught: only the passage count and the bars' ETA; no time said up front (issue 14,
    # case 11). The estimate must be out while most of the work is still to do.
    import nest_core.stores.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "LARGE_INGEST", 3)
    docs = [Document(text=SENTENCE.format(i=i), id=f"n/{i}.md") for i in range(6)]
    said_by_call: list[str] = []  # what stderr held when each embedding call began

    class Watching(HashingEmbeddings):
        def __call__(self, texts):
            said_by_call.append(capsys.readouterr().err)
            return super().__call__(texts)

    store = open_faiss_store(tmp_path / "s", embed=EMBED)
    ingest(docs, store, embed=Watching(64), batch_size=2, progress=True, lm=tiny_lm,
           config=NestConfig(max_passage_tokens=64))
    said = "".join([*said_by_call, capsys.readouterr().err])
    estimate = re.compile(r"6 passages: (under 1 min|about \d+ min) to embed, "
                          r"(under 1 min|about \d+ min) to encode spans \(timed on the first")
    assert estimate.search(said), said
    first, second = said_by_call[0], "".join(said_by_call[:2])  # before batch 1; before 2
    assert not estimate.search(first)
    assert estimate.search(second)  # after one of three batches, before any bulk encoding
    assert "the same command resumes" in said


def test_durations_are_said_to_an_estimates_precision():
    from nest_core.stores.ingest import _duration

    assert [_duration(s) for s in (0, 59, 60, 61, 3599, 3600, 3 * 3600 + 5 * 60)] == [
        "under 1 min", "under 1 min", "about 1 min", "about 2 min", "about 1 h", "about 1 h",
        "about 3 h 5 min"]


# --- issue 26: ids relative to recorded roots, concurrent writers, model fingerprints -------
def test_roots_give_distinct_ids_to_folders_of_one_name(tmp_path):
    from nest_core.stores.roots import ROOTS_FILE, assign_ids

    x, y = tmp_path / "x" / "notes", tmp_path / "y" / "notes"
    for folder in (x / "sub", y):
        folder.mkdir(parents=True)
    for f in (x / "a.md", x / "sub" / "b.md", y / "a.md"):
        f.write_text("text", "utf-8")
    store = tmp_path / "store"
    ided, prefixes = assign_ids(store, [(x / "a.md", "?"), (x / "sub" / "b.md", "?")], [x])
    assert [i for _, i in ided] == ["notes/a.md", "notes/sub/b.md"]
    assert prefixes == ["notes/"]
    ided, prefixes = assign_ids(store, [(y / "a.md", "?")], [y])
    (doc_id,) = [i for _, i in ided]
    assert doc_id.startswith("notes~")
    assert prefixes == [doc_id.rsplit("/", 1)[0] + "/"]
    # a subfolder of a recorded root keys inside it; re-recording changes nothing
    ided, prefixes = assign_ids(store, [(x / "sub" / "b.md", "?")], [x / "sub"])
    assert (ided[0][1], prefixes) == ("notes/sub/b.md", ["notes/sub/"])
    # the parent of a recorded root: its files keep their ids, and it covers them
    (tmp_path / "x" / "top.md").write_text("text", "utf-8")
    ided, prefixes = assign_ids(store, [(tmp_path / "x" / "top.md", "?"), (x / "a.md", "?"),
                                        (x / "a.md", "?")], [tmp_path / "x"])
    assert [i for _, i in ided] == ["x/top.md", "notes/a.md"]
    assert prefixes == ["notes/", "x/"]
    assert "notes" in (store / ROOTS_FILE).read_text("utf-8")


def test_a_writer_adds_to_what_another_saved_after_it_opened_the_store(tmp_path):
    """Two writers that both opened the store before either saved (two `nest index` runs):
    the second takes up the first's passages under the lock instead of overwriting them."""
    first, second = (open_faiss_store(tmp_path, embed=EMBED) for _ in range(2))
    ingest(DOCS[:2], first, embed=EMBED, progress=False)
    ingest(DOCS[2:], second, embed=EMBED, progress=False)
    reopened = FaissStore.open(tmp_path)
    assert {i.split("#")[0] for i in reopened.ids()} == {d.doc_id for d in DOCS}
    assert len(reopened) == len(first) + 1


def test_a_model_fingerprint_follows_its_files_not_its_folder_name(tmp_path, monkeypatch):
    from nest_core.stores.embeddings import FINGERPRINT_CACHE, folder_fingerprint

    monkeypatch.setenv("NEST_CACHE_DIR", str(tmp_path / "cache"))

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for folder in (a, b):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"dim": 4}', "utf-8")
        (folder / "model.safetensors").write_bytes(bytes(range(256)))
        (folder / "README.md").write_text(f"copied to {folder}", "utf-8")
    assert folder_fingerprint(a) == folder_fingerprint(b)
    assert (tmp_path / "cache" / FINGERPRINT_CACHE).is_file()
    (b / "model.safetensors").write_bytes(bytes(range(255)) + b"\x00")
    assert folder_fingerprint(a) != folder_fingerprint(b)
