"""Nest over a persisted Chroma store through LangChain, offline.

    python examples/langchain_chroma.py ["your question"] [--db DIR] [--max-tokens N]

The first run splits the handbook in examples/data with LangChain's text splitter, embeds
the chunks with the bundled all-MiniLM-L6-v2 and persists a Chroma collection; later runs
reopen it from disk (and reuse the encoded passage keys kept in ``DIR/nest_spans``). The
answer streams as Nest accepts it, then prints again with numbered citations.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This file is named like the `langchain_chroma` package; run as a script, its folder comes
# first on sys.path and would shadow the package. Drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

from langchain_core.documents import Document  # noqa: E402

from nest_core.models import cache_dir  # noqa: E402
from nest_integrations.langchain import ChatNest, NestMiniLMEmbeddings, format_citations  # noqa: E402

DATA = Path(__file__).parent / "data"
QUESTION = "Where is the headquarters of Halvorsen Orchard Robotics?"


def load_handbook(folder: Path = DATA) -> list[Document]:
    """The handbook split the LangChain way: one Document per file, then
    ``RecursiveCharacterTextSplitter(add_start_index=True)``, whose ``start_index`` with the
    file name gives every chunk a stable id (``source#start_index``) and exact offsets."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    docs = []
    for path in sorted(folder.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip()
        docs.append(Document(page_content=text, metadata={"source": path.name, "title": title}))
    splitter = RecursiveCharacterTextSplitter(chunk_size=400, chunk_overlap=0,
                                              add_start_index=True)
    return splitter.split_documents(docs)


def open_store(db: Path, embeddings: NestMiniLMEmbeddings):
    from langchain_chroma import Chroma

    if (db / "chroma.sqlite3").is_file():
        return Chroma(collection_name="handbook", embedding_function=embeddings,
                      persist_directory=str(db))
    docs = load_handbook()
    ids = [f"{d.metadata['source']}#{d.metadata['start_index']}" for d in docs]
    print(f"indexing {len(docs)} chunks into {db}", file=sys.stderr)
    return Chroma.from_documents(docs, embeddings, ids=ids, collection_name="handbook",
                                 persist_directory=str(db))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--db", type=Path, default=cache_dir() / "examples" / "chroma")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    store = open_store(args.db, NestMiniLMEmbeddings())
    chat = ChatNest(vectorstore=store, k=4, max_tokens=args.max_tokens,
                    datastore_dir=str(args.db / "nest_spans"))
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    full = None
    for chunk in chat.stream(args.question):
        print(chunk.text, end="", flush=True)
        full = chunk if full is None else full + chunk
    block = full.content[0]
    nest = full.response_metadata["nest"]
    print(f"\n\nWith citations ({nest['attribution_ratio']:.0%} of tokens copied, "
          f"{nest['stats']['tokens_per_forward']:.1f} tokens per forward):\n")
    print(format_citations(block["text"], block.get("annotations", [])))


if __name__ == "__main__":
    main()
