"""LlamaIndex + FAISS: persist an index, reload it with its StorageContext, stream a Nest answer.

A LlamaIndex FAISS store holds vectors only; node text lives in the persisted docstore, so
the index is reloaded with ``load_index_from_storage`` and handed to
``NestQueryEngine.from_index``. Pages are read with ``SimpleDirectoryReader`` and split with
``SentenceSplitter``. Runs offline (bundled MiniLM and SmolLM2).

    python examples/llamaindex_faiss.py "Where is the Ghent office?"
    python examples/llamaindex_faiss.py --persist-dir /tmp/handbook-faiss
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from llamaindex_chroma import load_documents, print_response

EMBED_DIM = 384  # all-MiniLM-L6-v2


def build(persist_dir: Path, embed_model) -> None:
    """Embed the handbook into a flat FAISS index and persist index + docstore together."""
    import faiss
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.vector_stores.faiss import FaissVectorStore

    print(f"building the FAISS index in {persist_dir} ...")
    storage = StorageContext.from_defaults(
        vector_store=FaissVectorStore(faiss_index=faiss.IndexFlatL2(EMBED_DIM)))
    VectorStoreIndex.from_documents(
        load_documents(), embed_model=embed_model, storage_context=storage,
        transformations=[SentenceSplitter(chunk_size=160, chunk_overlap=20)])
    storage.persist(persist_dir=str(persist_dir))


def reload(persist_dir: Path, embed_model):
    from llama_index.core import StorageContext, load_index_from_storage
    from llama_index.vector_stores.faiss import FaissVectorStore

    store = FaissVectorStore.from_persist_dir(str(persist_dir))  # faiss.read_index, no pickle
    storage = StorageContext.from_defaults(vector_store=store, persist_dir=str(persist_dir))
    return load_index_from_storage(storage, embed_model=embed_model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="When did the Ghent office open?")
    parser.add_argument("--persist-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "nest-example-llamaindex-faiss")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from nest_core.stores.datastore import datastore_dir_for
    from nest_integrations.llama_index import NestQueryEngine, bundled_embedding

    embed_model = bundled_embedding()  # explicit: LlamaIndex would default to OpenAI
    if not (args.persist_dir / "docstore.json").is_file():
        build(args.persist_dir, embed_model)
    index = reload(args.persist_dir, embed_model)
    engine = NestQueryEngine.from_index(
        index, similarity_top_k=args.top_k, max_new_tokens=args.max_new_tokens,
        streaming=True,
        datastore_dir=str(datastore_dir_for(args.persist_dir)))
    print(f"Question: {args.question}")
    streaming = engine.query(args.question)
    print("Answer (streaming): ", end="")
    streaming.print_response_stream()  # keeps the text for get_response()
    print(f"\n({len(streaming.metadata['nest_spans'])} spans filled in while streaming)")
    print_response(streaming.get_response())


if __name__ == "__main__":
    main()
