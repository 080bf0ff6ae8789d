"""The public surface of nest_core and the integrations, pinned name by name: adding, removing
or renaming a public name must change this file too. Importing nest_core stays light."""

import importlib
import subprocess
import sys

import pytest

import nest_core

PUBLIC_API = {
    "nest_core": [
        "ChromaSource",
        "DecodeStats",
        "Document",
        "EmptyStoreError",
        "EncodedPassage",
        "FaissSource",
        "FaissStore",
        "HashingEmbeddings",
        "InMemorySource",
        "KeyCache",
        "LanguageModel",
        "MemoryKeyCache",
        "NestChunk",
        "NestConfig",
        "NestDecoder",
        "NestResult",
        "Passage",
        "PassageEncoder",
        "PassageSource",
        "SentenceTransformerEmbeddings",
        "Span",
        "SpanDatastore",
        "__version__",
        "cache_dir",
        "chunk_document",
        "clear_cache",
        "default_embedding_function",
        "default_gguf_path",
        "ingest",
        "load_model",
        "match_spans",
        "open_chroma_collection",
        "open_faiss_store",
    ],
    "nest_integrations.langchain": [
        "ChatNest",
        "NestLLM",
        "NestMiniLMEmbeddings",
        "NestToolInput",
        "create_nest_chain",
        "create_nest_tool",
        "document_to_passage",
        "documents_to_blocks",
        "documents_to_passages",
        "format_citations",
        "passage_to_document",
        "span_to_citation",
        "stable_document_id",
    ],
    "nest_integrations.llama_index": [
        "NestChatEngine",
        "NestLLM",
        "NestQueryEngine",
        "NestQueryEngineTool",
        "NestRetrievalError",
        "bundled_embedding",
        "bundled_minilm_path",
        "nodes_to_passages",
    ],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC_API))
def test_public_names_are_exactly_the_pinned_ones(module_name):
    module = importlib.import_module(module_name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"duplicate names in {module_name}.__all__"
    assert sorted(exported) == PUBLIC_API[module_name]
    for name in exported:
        assert getattr(module, name) is not None, f"{module_name}.{name}"


def test_lazy_exports_cover_every_public_name():
    # nest_core resolves its names lazily from _EXPORTS: a public name missing there would
    # raise AttributeError on first use, an extra one would be reachable but undeclared.
    assert sorted({*nest_core._EXPORTS, "__version__"}) == PUBLIC_API["nest_core"]


def test_import_does_not_pull_heavy_optional_packages():
    code = ("import sys, nest_core, nest_core.types; heavy = [m for m in ('chromadb', 'faiss', "
            "'transformers', 'sentence_transformers', 'langchain_core', 'llama_index', 'torch') "
            "if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
