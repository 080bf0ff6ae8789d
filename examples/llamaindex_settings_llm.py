"""``Settings.llm = NestLLM()``: LlamaIndex's own engines, Nest decoding, span metadata.

The stock code a LlamaIndex user writes, unchanged: ``index.as_query_engine()`` (any
``response_mode``), ``CitationQueryEngine`` and ``index.as_chat_engine()`` (default,
``context``, ``condense_plus_context``). Each gives its synthesizer the retrieved,
post-processed nodes; ``NestLLM`` decodes over exactly those (no second retrieval) and the
spans it copied arrive in ``response.metadata["nest_spans"]`` (a chat answer's
``.metadata``), each naming its node and file. Runs offline (bundled MiniLM and SmolLM2);
pages are read with ``SimpleDirectoryReader`` and split with ``SentenceSplitter``.

    python examples/llamaindex_settings_llm.py "When did the Ghent office open?"
    python examples/llamaindex_settings_llm.py --engine citation
    python examples/llamaindex_settings_llm.py --engine chat
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
ENGINES = ["query", "refine", "tree_summarize", "citation", "chat", "chat-context"]


def ask(index: Any, engine: str, question: str) -> Any:
    """The answer of one stock engine (a ``Response`` or an ``AgentChatResponse``)."""
    from llama_index.core.query_engine import CitationQueryEngine

    if engine == "citation":
        return CitationQueryEngine.from_args(index, similarity_top_k=3).query(question)
    if engine.startswith("chat"):
        mode = {"chat": "best", "chat-context": "context"}[engine]
        return index.as_chat_engine(chat_mode=mode, similarity_top_k=3).chat(question)
    mode = "compact" if engine == "query" else engine
    return index.as_query_engine(response_mode=mode, similarity_top_k=3).query(question)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="When did the Ghent office open?")
    parser.add_argument("--engine", choices=ENGINES, default="query")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    from nest_integrations.llama_index import NestLLM, bundled_embedding

    Settings.embed_model = bundled_embedding()  # explicit: the default would be OpenAI
    Settings.llm = NestLLM(max_new_tokens=args.max_new_tokens)
    Settings.transformations = [SentenceSplitter(chunk_size=160, chunk_overlap=20)]

    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(str(DATA)).load_data())
    response = ask(index, args.engine, args.question)

    print(f"Question: {args.question}\nAnswer ({args.engine}): {response.response}\n")
    for s in (response.metadata or {}).get("nest_spans", []):
        print(f"  answer[{s['out_start']}:{s['out_end']}] <- [{s['source_index']}] "
              f"{s['title']} (node {s['node_id'][:8]}) chars "
              f"{s.get('doc_start')}-{s.get('doc_end')}: {s['cited_text']!r}")


if __name__ == "__main__":
    main()
