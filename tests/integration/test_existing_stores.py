"""``nest ask`` over stores that LangChain and LlamaIndex wrote with their own classes, each
with its own embedding model (issue 11, scenario 5).

Two real sentence-transformers models: the bundled all-MiniLM-L6-v2 (384-d), and a 128-d
model made from it here (a seeded ``Dense`` projection, saved to a tmp dir), so a store
queried with the wrong one really mismatches. The stores are written by
``langchain_chroma.Chroma``, LlamaIndex's ``VectorStoreIndex`` on ``FaissVectorStore`` and on
``ChromaVectorStore``, and ``langchain_community``'s ``FAISS.save_local``; the documents are
split by the frameworks' own splitters. ``nest`` runs in-process (``main([...])``), so the
real SmolLM2 loads once for the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

pytest.importorskip("langchain_chroma", reason="needs the langchain extra")
pytest.importorskip("langchain_community", reason="needs the langchain extra")
pytest.importorskip("llama_index.vector_stores.faiss", reason="needs the llamaindex extra")
pytest.importorskip("llama_index.embeddings.huggingface", reason="needs the llamaindex extra")

FILES = {
    "history.md": "The Zephyr Widget Company was founded in 1987 by Marta Quillfeather in "
                  "Ostrava. It makes brass widgets for clock towers, and its first factory "
                  "stood beside the river.",
    "policy.txt": "Every employee of the Zephyr Widget Company receives 31 days of paid leave "
                  "per year, and the factory closes for the Widget Fair in the second week "
                  "of June.",
    "lighthouse.txt": "The Brannock lighthouse on Skerry Point was built of granite in 1873, "
                      "and its lamp can be seen from nineteen nautical miles away.",
}
FOUNDED = "When was the Zephyr Widget Company founded?"
LIGHTHOUSE = "When was the Brannock lighthouse built?"
MAX_NEW = "24"


# --- the two embedding models and the stores, each written by its framework ------------------
@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    from nest_core.stores.embeddings import default_embedding_model_dir

    return default_embedding_model_dir()


@pytest.fixture(scope="module")
def small_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model: MiniLM + a seeded 384 -> 128 projection + normalisation."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    base = SentenceTransformer(str(minilm_dir), device="cpu")
    torch.manual_seed(0)
    dense = Dense(384, 128, activation_function=torch.nn.Identity())
    out = tmp_path_factory.mktemp("models") / "zephyr-128"
    SentenceTransformer(modules=[base[0], base[1], dense, Normalize()], device="cpu").save(
        str(out))
    assert SentenceTransformer(str(out), device="cpu").get_embedding_dimension() == 128
    return out


class LangChainST:
    """A LangChain ``Embeddings`` over a local sentence-transformers model (what
    ``HuggingFaceEmbeddings`` does, without its package)."""

    def __new__(cls, path: Path) -> Any:
        from langchain_core.embeddings import Embeddings
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu")

        class _Embeddings(Embeddings):
            def embed_documents(self, texts: list[str]) -> list[list[float]]:
                return model.encode(texts, normalize_embeddings=True).tolist()

            def embed_query(self, text: str) -> list[float]:
                return self.embed_documents([text])[0]

        return _Embeddings()


def langchain_chunks() -> list[Any]:
    from langchain_core.documents import Document
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    docs = [Document(page_content=text, metadata={"source": name})
            for name, text in FILES.items()]
    splitter = RecursiveCharacterTextSplitter(chunk_size=400, chunk_overlap=0,
                                              add_start_index=True)
    return splitter.split_documents(docs)


def llama_index_over(vector_store: Any, model_dir: Path, persist_dir: Path | None) -> None:
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    docs = [Document(text=text, metadata={"source": name}) for name, text in FILES.items()]
    context = StorageContext.from_defaults(vector_store=vector_store)
    VectorStoreIndex.from_documents(
        docs, storage_context=context, transformations=[SentenceSplitter(chunk_size=256)],
        embed_model=HuggingFaceEmbedding(model_name=str(model_dir), device="cpu"))
    if persist_dir is not None:
        context.persist(persist_dir=str(persist_dir))


@pytest.fixture(scope="module")
def langchain_chroma(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``langchain_chroma.Chroma`` with MiniLM: collection ``langchain``."""
    from langchain_chroma import Chroma

    out = tmp_path_factory.mktemp("lc-chroma")
    Chroma.from_documents(langchain_chunks(), LangChainST(minilm_dir), persist_directory=str(out))
    return out


@pytest.fixture(scope="module")
def llama_faiss(small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LlamaIndex ``FaissVectorStore`` + ``persist`` with the 128-d model."""
    import faiss
    from llama_index.vector_stores.faiss import FaissVectorStore

    out = tmp_path_factory.mktemp("llama-index")
    llama_index_over(FaissVectorStore(faiss_index=faiss.IndexFlatL2(128)), small_dir, out)
    return out


@pytest.fixture(scope="module")
def langchain_faiss(small_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LangChain ``FAISS.save_local`` with the 128-d model (its docstore is a pickle)."""
    from langchain_community.vectorstores import FAISS

    out = tmp_path_factory.mktemp("lc-faiss")
    FAISS.from_documents(langchain_chunks(), LangChainST(small_dir)).save_local(str(out))
    return out


@pytest.fixture(scope="module")
def shared_chroma(minilm_dir: Path, small_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Chroma directory, two collections: LangChain's (MiniLM) and LlamaIndex's
    ``handbook`` (128-d, with ``_node_content`` & co. in its metadata)."""
    import chromadb
    from langchain_chroma import Chroma
    from llama_index.vector_stores.chroma import ChromaVectorStore

    out = tmp_path_factory.mktemp("shared-chroma")
    Chroma.from_documents(langchain_chunks(), LangChainST(minilm_dir), persist_directory=str(out))
    collection = chromadb.PersistentClient(path=str(out)).get_or_create_collection("handbook")
    llama_index_over(ChromaVectorStore(chroma_collection=collection), small_dir, None)
    return out


# --- running nest ----------------------------------------------------------------------------
def nest(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``nest ARGS`` in-process: (exit code, stdout, stderr); never a traceback."""
    from nest_core.app.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def ask_json(capsys: pytest.CaptureFixture[str], question: str, store: Path,
             *options: str) -> tuple[dict[str, Any], str]:
    code, out, err = nest(capsys, "ask", question, "--store", str(store), "--json", "--k", "2",
                          "--max-new-tokens", MAX_NEW, *options)
    assert code == 0, err
    return json.loads(out)["nest"], err


def assert_cites(result: dict[str, Any], source: str, fact: str) -> None:
    """Copied spans exist, each is verbatim in its passage, and the fact came from ``source``."""
    assert result["spans"], f"nothing copied: {result['text']!r}"
    passages = {p["id"]: p for p in result["passages"]}
    for span in result["spans"]:
        text = passages[span["passage_id"]]["text"]
        assert text[span["src_start"]:span["src_end"]] == span["text"]
        assert result["text"][span["out_start"]:span["out_end"]] == span["text"]
    citing = [s for s in result["spans"] if fact in s["text"]]
    assert citing, f"{fact!r} not copied: {[s['text'] for s in result['spans']]}"
    assert {s["metadata"]["source"] for s in citing} == {source}


def assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 1, err
    assert err.startswith("nest: error: ") or "\nnest: error: " in err, err
    assert "--debug" not in err, f"an expected error must not ask for a traceback: {err}"
    for needle in needles:
        assert needle in err, err


# --- answering over each store ---------------------------------------------------------------
def test_ask_over_a_langchain_chroma_dir(capsys, langchain_chroma):
    result, err = ask_json(capsys, FOUNDED, langchain_chroma)
    assert "using the only Chroma collection" in err
    assert "'langchain'" in err
    assert_cites(result, "history.md", "1987")
    cited = next(p for p in result["passages"] if p["id"] == result["spans"][0]["passage_id"])
    assert cited["metadata"]["start_index"] == 0  # LangChain's splitter offsets ride along


def test_ask_over_a_llamaindex_faiss_dir_with_its_own_embedding(capsys, llama_faiss, small_dir):
    assert not (llama_faiss / "nest_spans").exists()
    result, _ = ask_json(capsys, FOUNDED, llama_faiss, "--embedding", str(small_dir))
    assert_cites(result, "history.md", "1987")
    assert all(not str(k).startswith("_") for p in result["passages"] for k in p["metadata"])


def test_langchain_save_local_is_refused_without_the_opt_in(capsys, langchain_faiss,
                                                           small_dir):
    for command in (("ask", LIGHTHOUSE, "--store", str(langchain_faiss)),
                    ("index", "--from-store", str(langchain_faiss))):
        code, _, err = nest(capsys, *command, "--embedding", str(small_dir))
        assert_clean_error(code, err, "index.pkl is a Python pickle",
                           "--allow-dangerous-deserialization")


def test_langchain_save_local_answers_with_the_opt_in(capsys, langchain_faiss, small_dir):
    result, _ = ask_json(capsys, LIGHTHOUSE, langchain_faiss, "--embedding", str(small_dir),
                         "--allow-dangerous-deserialization")
    assert_cites(result, "lighthouse.txt", "1873")


def test_chroma_collections_by_name(capsys, shared_chroma, small_dir):
    code, _, err = nest(capsys, "ask", FOUNDED, "--store", str(shared_chroma))
    assert_clean_error(code, err, "holds 2 Chroma collections ['handbook', 'langchain']",
                       "--collection NAME")
    code, _, err = nest(capsys, "ask", FOUNDED, "--store", str(shared_chroma),
                        "--collection", "manual")
    assert_clean_error(code, err, "collection 'manual' does not exist",
                       "['handbook', 'langchain']")
    result, _ = ask_json(capsys, FOUNDED, shared_chroma, "--collection", "handbook",
                         "--embedding", str(small_dir))
    assert_cites(result, "history.md", "1987")
    for passage in result["passages"]:  # LlamaIndex's bookkeeping is stripped
        assert "_node_content" not in passage["metadata"]
        assert "doc_id" in passage["metadata"]


# --- the embedding mismatch, said plainly -----------------------------------------------------
def test_without_the_stores_embedding_the_mismatch_is_one_clear_line(
        capsys, llama_faiss, langchain_chroma, small_dir):
    code, _, err = nest(capsys, "ask", FOUNDED, "--store", str(llama_faiss))
    assert_clean_error(code, err, f"the LlamaIndex FAISS store at {llama_faiss} holds 128-d "
                       f"vectors (it does not record which embedding model built it), but the "
                       f"embedding 'all-MiniLM-L6-v2' gives 384-d vectors",
                       "`--embedding NAME_OR_DIR`")
    code, _, err = nest(capsys, "ask", FOUNDED, "--store", str(langchain_chroma),
                        "--embedding", str(small_dir))
    assert_clean_error(code, err, "Chroma collection 'langchain' holds 384-d vectors",
                       "the embedding 'zephyr-128' gives 128-d vectors")


def test_a_nest_store_names_the_model_it_was_built_with(capsys, tmp_path, small_dir):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "history.md").write_text(FILES["history.md"], encoding="utf-8")
    code, _, err = nest(capsys, "index", str(corpus), "--out", str(tmp_path / "store"),
                        "--no-precompute", "-q")
    assert code == 0, err
    code, _, err = nest(capsys, "ask", FOUNDED, "--store", str(tmp_path / "store"),
                        "--embedding", str(small_dir))
    assert_clean_error(code, err, "holds 384-d vectors, built with the embedding model "
                       "'all-MiniLM-L6-v2', but the embedding 'zephyr-128' gives 128-d",
                       "Use 'all-MiniLM-L6-v2' (its name or folder): `--embedding "
                       "NAME_OR_DIR`")
    code, _, err = nest(capsys, "ask", FOUNDED, "--store", str(tmp_path / "store"),
                        "--embedding", str(tmp_path / "no-model"))
    assert_clean_error(code, err, "no-model: no such folder", "local Hugging Face cache")
    # nest index --embedding records the model; --collection names the Chroma collection
    code, _, err = nest(capsys, "index", str(corpus), "--store", "chroma", "--out",
                        str(tmp_path / "chroma"), "--collection", "handbook", "--embedding",
                        str(small_dir), "--no-precompute", "-q")
    assert code == 0, err
    code, _, err = nest(capsys, "ask", FOUNDED, "--store", str(tmp_path / "chroma"))
    assert "using the only Chroma collection" in err
    assert_clean_error(code, err, "Chroma collection 'handbook' holds 128-d vectors, built with "
                       "the embedding model 'zephyr-128', but the embedding 'all-MiniLM-L6-v2' "
                       "gives 384-d vectors")


# --- the span datastore of a store nest did not write ----------------------------------------
def test_index_from_store_precomputes_every_passage(capsys, llama_faiss, small_dir, tmp_path):
    from nest_core import NestDecoder
    from nest_core.app.common import nest_config
    from nest_core.models import load_model
    from nest_core.stores.datastore import SpanDatastore
    from nest_core.stores.embeddings import load_embedding
    from nest_core.stores.sources import open_store, span_datastore_dir

    store = tmp_path / "store"
    shutil.copytree(llama_faiss, store, ignore=shutil.ignore_patterns("nest_spans"))
    code, _, err = nest(capsys, "index", "--from-store", str(store), "-q")
    assert code == 0, err
    source = open_store(store, embed=load_embedding(small_dir))
    assert f"done: {len(source.passages())} passages encoded" in err
    assert span_datastore_dir(store) == store / "nest_spans"  # writable: inside the store
    assert len(SpanDatastore(store / "nest_spans")) == len(source.passages())
    # what `nest ask` does next: the same model, settings and datastore run no LM on passages
    lm = load_model()
    decoder = NestDecoder(lm, nest_config("default", lm.name),
                          key_cache=SpanDatastore(span_datastore_dir(store)))
    calls: list[int] = []
    handle = lm.model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert decoder.prepare(source.retrieve(FOUNDED, 2)) > 0
    finally:
        handle.remove()
    assert calls == []
    result, _ = ask_json(capsys, FOUNDED, store, "--embedding", str(small_dir))
    assert_cites(result, "history.md", "1987")


def test_embedding_by_name_from_the_local_hugging_face_cache(llama_faiss, small_dir, tmp_path):
    """``--embedding ORG/NAME`` resolves in the local Hub cache (HF_HUB_OFFLINE=1, nothing
    downloaded); a subprocess, because huggingface_hub reads HF_HUB_CACHE at import."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--local--zephyr-128"
    (repo / "refs").mkdir(parents=True)
    revision = "0" * 40
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(small_dir, repo / "snapshots" / revision)
    script = (
        "import sys\n"
        "from nest_core.stores.embeddings import load_embedding\n"
        "from nest_core.stores.sources import open_store\n"
        "embed = load_embedding('local/zephyr-128')\n"
        "hit = open_store(sys.argv[1], embed=embed).retrieve(sys.argv[2], 1)[0]\n"
        "print(embed.name, hit.metadata['source'])\n"
        "try:\n"
        "    load_embedding('local/not-cached')\n"
        "except FileNotFoundError as err:\n"
        "    print(err)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-c", script, str(llama_faiss), FOUNDED],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "local/zephyr-128 history.md"
    assert lines[1].startswith("--embedding local/not-cached: no such folder, and no model")
