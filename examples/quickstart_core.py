"""The core API in one page: passages in, an answer with attributed spans out.

No framework and no vector store: the sample handbook (examples/data) is chunked and searched
in memory with the bundled MiniLM, and the bundled SmolLM2 answers with Nest. Passage keys are
kept in the persistent span datastore, so a second run skips re-encoding them.

    python examples/quickstart_core.py "What is the paid leave allowance?"
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nest_core import NestDecoder, load_model
from nest_core.app.render import render_terminal, stats_line, use_color
from nest_core.stores.datastore import SpanDatastore
from nest_core.stores.ingest import Document, chunk_document
from nest_core.stores.sources import InMemorySource

DATA = Path(__file__).parent / "data"


def handbook_passages() -> list:
    """~100-word passages of every handbook page, titled by the page's first heading."""
    passages = []
    for path in sorted(DATA.glob("*.md")):
        heading, _, body = path.read_text(encoding="utf-8").partition("\n")
        title = heading.lstrip("# ").strip()  # the LM reads "{title}\n{text}" anyway
        doc = Document(text=body.strip(), title=title, id=path.name,
                       metadata={"source": path.name})
        passages += chunk_document(doc, words_per_passage=100)
    return passages


def main(question: str) -> None:
    source = InMemorySource(handbook_passages())        # stage 1: passage retrieval
    passages = source.retrieve(question, k=8)

    lm = load_model()                                    # bundled SmolLM2-135M-Instruct
    # No config: the shipped defaults (nest_core.config.default_config). NestConfig() alone
    # is the paper's main setting, tuned for 7B-70B models.
    decoder = NestDecoder(lm, key_cache=SpanDatastore())
    result = decoder.generate(question, passages, max_new_tokens=64)

    print(render_terminal(result, color=use_color(sys.stdout)))
    print("\n" + stats_line(result))
    for span in result.spans:                            # the raw attribution
        print(f"  {span.text[:50]!r:54} <- {span.passage.id} "
              f"[{span.src_start}:{span.src_end}]")


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or "What is the paid leave allowance?")
