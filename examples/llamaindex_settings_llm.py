"""``Settings.llm = NestLLM()``: LlamaIndex's own query engine, Nest decoding, span metadata.

``index.as_query_engine()`` retrieves, post-processes and formats its usual text-QA prompt;
``NestLLM`` reads the context block of that prompt back as its passages (no second
retrieval) and the spans it copied arrive in ``response.metadata["nest_spans"]``, each naming
the source node it came from. Runs offline (bundled MiniLM and SmolLM2); pages are read with
``SimpleDirectoryReader`` and split with ``SentenceSplitter``.

    python examples/llamaindex_settings_llm.py "When did the Ghent office open?"
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="When did the Ghent office open?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    from nest_integrations.llama_index import NestLLM, bundled_embedding

    Settings.embed_model = bundled_embedding()  # explicit: the default would be OpenAI
    Settings.llm = NestLLM(max_new_tokens=args.max_new_tokens)
    Settings.transformations = [SentenceSplitter(chunk_size=160, chunk_overlap=20)]

    index = VectorStoreIndex.from_documents(SimpleDirectoryReader(str(DATA)).load_data())
    response = index.as_query_engine(similarity_top_k=3).query(args.question)

    print(f"Question: {args.question}\nAnswer: {response}\n")
    nodes = {n.node.node_id: n for n in response.source_nodes}
    for s in response.metadata["nest_spans"]:
        node = nodes[s["node_id"]].node
        print(f"  answer[{s['out_start']}:{s['out_end']}] <- {node.metadata['file_name']} "
              f"(node {s['node_id'][:8]}) chars {s.get('doc_start')}-{s.get('doc_end')}: "
              f"{s['cited_text']!r}")


if __name__ == "__main__":
    main()
