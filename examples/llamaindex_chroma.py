"""LlamaIndex + Chroma: swap the query engine for Nest and get span citations.

Runs offline: the bundled MiniLM embeds, the bundled SmolLM2 answers. The first run builds a
persistent Chroma collection from examples/data (the sample handbook); later runs reuse it
and the span datastore beside it (passage keys are not recomputed).

    python examples/llamaindex_chroma.py "Who founded Halvorsen Orchard Robotics?"
    python examples/llamaindex_chroma.py --stream --persist-dir /tmp/handbook-chroma
    python examples/llamaindex_chroma.py --similarity-cutoff 0.5 "When did the Ghent office open?"

Pages are read with ``SimpleDirectoryReader`` and split with ``SentenceSplitter``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
COLLECTION = "handbook"


def load_documents():
    """The handbook pages, read by LlamaIndex's own ``SimpleDirectoryReader`` (one Document
    per file, with ``file_name`` and ``file_path`` metadata)."""
    from llama_index.core import SimpleDirectoryReader

    return SimpleDirectoryReader(str(DATA), required_exts=[".md"]).load_data()


def open_store(persist_dir: Path, embed_model):
    """The persistent collection, built from the handbook on first use."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.vector_stores.chroma import ChromaVectorStore

    client = chromadb.PersistentClient(path=str(persist_dir),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    # embedding_function=None: Chroma's default would download a model; LlamaIndex embeds
    collection = client.get_or_create_collection(COLLECTION, embedding_function=None)
    store = ChromaVectorStore(chroma_collection=collection)
    if collection.count() == 0:
        print(f"building the Chroma collection in {persist_dir} ...")
        VectorStoreIndex.from_documents(
            load_documents(), embed_model=embed_model,
            storage_context=StorageContext.from_defaults(vector_store=store),
            transformations=[SentenceSplitter(chunk_size=160, chunk_overlap=20)])
    return store


def print_response(response) -> None:
    """The answer, its source nodes, and where each span came from (file, characters)."""
    print(f"\nAnswer: {response.response}\n")
    print("Source nodes:")
    for i, scored in enumerate(response.source_nodes, start=1):
        meta = response.metadata[scored.node.node_id]
        print(f"  [{i}] {meta.get('file_name')} score={scored.score:.3f} "
              f"node={scored.node.node_id[:8]}")
    print("Spans (copied from the sources):")
    for s in response.metadata["nest_spans"]:
        node = response.source_nodes[s["source_index"] - 1].node
        where = f"chars {s['doc_start']}-{s['doc_end']}" if "doc_start" in s else ""
        print(f"  answer[{s['out_start']}:{s['out_end']}] <- [{s['source_index']}] "
              f"{node.metadata.get('file_name')} {where}: {s['cited_text']!r}")
    stats = response.metadata.get("nest_stats", {})
    print(f"attribution ratio {response.metadata.get('nest_attribution_ratio', 0):.2f}, "
          f"{stats.get('tokens_per_forward', 0):.2f} tokens per LM forward, "
          f"{stats.get('tokens_per_second', 0):.1f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="Who founded Halvorsen Orchard Robotics?")
    parser.add_argument("--persist-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "nest-example-llamaindex-chroma")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--stream", action="store_true", help="print the answer as it decodes")
    parser.add_argument("--similarity-cutoff", type=float, default=None,
                        help="drop retrieved nodes scoring below this (SimilarityPostprocessor)")
    args = parser.parse_args()

    from llama_index.core.postprocessor import SimilarityPostprocessor

    from nest_core.stores.datastore import datastore_dir_for
    from nest_integrations.llama_index import NestQueryEngine, bundled_embedding

    embed_model = bundled_embedding()  # explicit: LlamaIndex would default to OpenAI
    store = open_store(args.persist_dir, embed_model)
    postprocessors = ([] if args.similarity_cutoff is None else
                      [SimilarityPostprocessor(similarity_cutoff=args.similarity_cutoff)])
    engine = NestQueryEngine.from_vector_store(
        store, embed_model=embed_model, similarity_top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, citation_markers=True, streaming=args.stream,
        node_postprocessors=postprocessors,
        datastore_dir=str(datastore_dir_for(args.persist_dir)))
    print(f"Question: {args.question}")
    response = engine.query(args.question)
    if args.stream:
        print("Answer (streaming): ", end="")
        response.print_response_stream()
        print()
        response = response.get_response()
    print_response(response)


if __name__ == "__main__":
    main()
