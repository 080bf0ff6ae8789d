"""Nest over a LangChain FAISS store with ``create_nest_chain``, offline.

    python examples/langchain_faiss.py ["your question"] [--max-tokens N]

Builds a ``langchain_community`` FAISS index of the handbook in examples/data (embedding 61
chunks takes a second or two) and runs the retrieval chain: the retrieved context streams
first, then the answer, then the answer again with numbered citations.

Reloading a saved index with ``FAISS.load_local`` needs ``allow_dangerous_deserialization=
True`` (it unpickles the docstore). That is your decision, for files you wrote yourself;
this example does not make it for you and rebuilds the index instead. The encoded passage
keys, which are the expensive part, persist in a Nest span datastore (no pickle) under the
cache directory, so later runs skip encoding.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.documents import Document

from nest_core.models import cache_dir
from nest_integrations.langchain import (
    ChatNest,
    NestMiniLMEmbeddings,
    create_nest_chain,
    format_citations,
)

DATA = Path(__file__).parent / "data"
QUESTION = "How many staff does the Ghent office have?"


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


def main() -> None:
    try:
        from langchain_community.vectorstores import FAISS
    except ImportError:
        sys.exit('this example needs langchain-community: pip install "nest-decoding[langchain]"')
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    docs = load_handbook()
    ids = [f"{d.metadata['source']}#{d.metadata['start_index']}" for d in docs]
    store = FAISS.from_documents(docs, NestMiniLMEmbeddings(), ids=ids)
    chat = ChatNest(max_tokens=args.max_tokens,
                    datastore_dir=str(cache_dir() / "examples" / "faiss_spans"))
    chain = create_nest_chain(store.as_retriever(search_kwargs={"k": 4}), chat)

    print(f"Q: {args.question}")
    answer = None
    for part in chain.stream({"input": args.question}):
        if "context" in part:
            print("Context: " + ", ".join(d.id for d in part["context"]) + "\nA: ", end="")
        if "answer" in part:
            print(part["answer"].text, end="", flush=True)
            answer = part["answer"] if answer is None else answer + part["answer"]
    block = answer.content[0]
    print("\n\nWith citations:\n")
    print(format_citations(block["text"], block.get("annotations", [])))


if __name__ == "__main__":
    main()
