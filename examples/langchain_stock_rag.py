"""LangChain's own RAG recipes with ChatNest as the model, offline.

    python examples/langchain_stock_rag.py ["your question"] [--db DIR]

Three stock patterns over the handbook in examples/data (a Chroma store persisted in DIR):

1. ``create_retrieval_chain`` + ``create_stuff_documents_chain``, the retrieved context in
   the system message. Give ChatNest the same retriever and it searches with the human turn,
   copies from the documents and cites their files.
2. The LangChain v1 RAG agent: ``create_agent`` with no tools and a ``@dynamic_prompt``
   middleware that pastes the documents into the system prompt.
3. Anthropic-style document blocks in the human turn (``documents_to_blocks``): the same
   message ChatAnthropic cites from.

The stuff chain ends in a ``StrOutputParser``; the cited message is read with a callback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# examples/langchain_chroma.py would shadow the `langchain_chroma` package when this folder
# comes first on sys.path (run as a script): drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402

from nest_core.models import cache_dir  # noqa: E402
from nest_integrations.langchain import (  # noqa: E402
    ChatNest,
    NestMiniLMEmbeddings,
    documents_to_blocks,
    format_citations,
)

DATA = Path(__file__).parent / "data"
QUESTION = "Where is the headquarters of Halvorsen Orchard Robotics?"
SYSTEM = ("You are an assistant for question-answering tasks. Use the following pieces of "
          "retrieved context to answer the question. If you don't know the answer, say that "
          "you don't know. Use three sentences maximum and keep the answer concise.\n\n"
          "{context}")


def open_store(db: Path) -> Any:
    from langchain_chroma import Chroma
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    embeddings = NestMiniLMEmbeddings()
    if (db / "chroma.sqlite3").is_file():
        return Chroma(embedding_function=embeddings, persist_directory=str(db))
    docs = [Document(page_content=p.read_text(encoding="utf-8"), metadata={"source": p.name})
            for p in sorted(DATA.glob("*.md"))]
    splitter = RecursiveCharacterTextSplitter(chunk_size=400, chunk_overlap=0,
                                              add_start_index=True)
    return Chroma.from_documents(splitter.split_documents(docs), embeddings,
                                 persist_directory=str(db))


class CitedMessage(BaseCallbackHandler):
    """Keeps the chat model's message (with its citations) that a parser turns into a str."""

    message: Any = None

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        self.message = response.generations[0][0].message


def show(title: str, message: Any) -> None:
    annotations = message.content[0].get("annotations", [])
    print(f"--- {title}\n{format_citations(message.text, annotations)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default=QUESTION)
    parser.add_argument("--db", type=Path, default=cache_dir() / "examples" / "stock-rag")
    args = parser.parse_args()
    store = open_store(args.db)
    retriever = store.as_retriever(search_kwargs={"k": 4})

    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("human", "{input}")])
    chat = ChatNest(retriever=retriever, max_tokens=64)
    rag_chain = create_retrieval_chain(retriever, create_stuff_documents_chain(chat, prompt))
    seen = CitedMessage()
    rag_chain.invoke({"input": args.question}, config={"callbacks": [seen]})
    show("create_stuff_documents_chain", seen.message)

    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRequest, dynamic_prompt

    @dynamic_prompt
    def prompt_with_context(request: ModelRequest) -> str:
        docs = store.similarity_search(request.state["messages"][-1].text)
        return ("You are a helpful assistant. Use the following context in your response:"
                "\n\n" + "\n\n".join(d.page_content for d in docs))

    agent = create_agent(chat, tools=[], middleware=[prompt_with_context])
    state = agent.invoke({"messages": [HumanMessage(args.question)]})
    show("@dynamic_prompt agent", state["messages"][-1])

    blocks = documents_to_blocks(store.similarity_search(args.question, k=4))
    message = ChatNest(max_tokens=64).invoke(
        [HumanMessage(content=[*blocks, {"type": "text", "text": args.question}])])
    show("document blocks", message)


if __name__ == "__main__":
    main()
