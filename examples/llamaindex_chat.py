"""A LlamaIndex chat over the handbook whose answers cite spans, follow-ups included.

``NestChatEngine`` condenses each follow-up into a standalone question (a deterministic
rule: pronouns become the conversation's subject, so "And where is its headquarters?" after
a question about Halvorsen Orchard Robotics asks about Halvorsen Orchard Robotics), answers
it with a ``NestQueryEngine`` and keeps the chat history. Runs offline (bundled MiniLM and
SmolLM2); pages are read with ``SimpleDirectoryReader`` and split with ``SentenceSplitter``.

    python examples/llamaindex_chat.py                      # the two turns in TURNS
    python examples/llamaindex_chat.py "first message" "follow-up" ...
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).parent / "data"
TURNS = ["Who founded Halvorsen Orchard Robotics?", "And where is its headquarters?"]


def build_chat(max_new_tokens: int):
    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    from nest_integrations.llama_index import (
        NestChatEngine,
        NestQueryEngine,
        bundled_embedding,
    )

    index = VectorStoreIndex.from_documents(
        SimpleDirectoryReader(str(DATA)).load_data(),
        embed_model=bundled_embedding(),  # explicit: LlamaIndex would default to OpenAI
        transformations=[SentenceSplitter(chunk_size=160, chunk_overlap=20)])
    engine = NestQueryEngine.from_index(index, similarity_top_k=3,
                                        max_new_tokens=max_new_tokens)
    return NestChatEngine.from_defaults(engine)


def print_turn(message: str, response) -> None:
    print(f"\nUser: {message}")
    print(f"  (standalone question: {response.sources[0].raw_input['query']})")
    print(f"Assistant: {response.response}")
    for s in response.metadata["nest_spans"]:
        node = response.source_nodes[s["source_index"] - 1].node
        print(f"  answer[{s['out_start']}:{s['out_end']}] <- {node.metadata['file_name']} "
              f"chars {s.get('doc_start')}-{s.get('doc_end')}: {s['cited_text']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("turns", nargs="*", default=TURNS, help="the user's messages")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    chat = build_chat(args.max_new_tokens)
    for message in args.turns:
        print_turn(message, chat.chat(message))
    print(f"\n{len(chat.chat_history)} messages in the chat history")


if __name__ == "__main__":
    main()
