"""LangChain ``Document`` <-> Nest ``Passage`` adapters, and spans -> standard citations.

Both kinds of span become citations: ``extras["kind"]`` is ``"copied"`` (Nest's copy path
produced the text) or ``"matched"`` (the LM wrote it and the document holds it verbatim).

Passage ids key citations (and tie a cited span back to its source document), so they must be
stable across runs and stores: ``Document.id`` when the store gave one, else
``"{source}#{start_index}"`` when a text splitter recorded where the chunk starts, else a hash
of the content. Vector stores disagree on score scales (squared L2, ``exp(-d)``, inner
product); Nest only needs the order, so the raw score is kept, never reinterpreted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages.content import Citation, create_citation

from nest_core.types import NestResult, Passage, Span

TITLE_KEYS = ("title", "name", "heading")
SCORE_KEY = "nest_score"


def stable_document_id(doc: Document) -> str:
    """The id a document's passage and citations use (see the module docstring for the order).

    A bare ``source`` is not enough: a text splitter makes many chunks of one source.
    """
    if doc.id:
        return str(doc.id)
    source = doc.metadata.get("source")
    start = doc.metadata.get("start_index")
    if source is not None and start is not None:
        return f"{source}#{start}"
    digest = hashlib.sha256(doc.page_content.encode("utf-8")).hexdigest()
    return f"sha256:{digest[:16]}"


def document_to_passage(doc: Document, score: float | None = None) -> Passage:
    """A passage over ``doc.page_content``; the title comes from ``metadata`` when present.

    Citation offsets index ``page_content`` exactly, so the text is passed through unchanged.
    """
    if not isinstance(doc, Document):
        msg = f"expected a langchain_core Document, got {type(doc).__name__}"
        raise TypeError(msg)
    title = next((str(doc.metadata[k]) for k in TITLE_KEYS if doc.metadata.get(k)), None)
    metadata = dict(doc.metadata)
    if score is not None:
        metadata[SCORE_KEY] = float(score)
    return Passage(id=stable_document_id(doc), text=doc.page_content, title=title,
                   metadata=metadata, score=None if score is None else float(score))


def documents_to_passages(
    docs: Iterable[Document | tuple[Document, float]],
) -> tuple[list[Passage], list[Document]]:
    """Passages for the decoder, and the source documents (with their stable ``id`` set) to
    hand back in ``response_metadata``. Duplicate ids keep the first (best-ranked) document."""
    passages: list[Passage] = []
    sources: list[Document] = []
    seen: set[str] = set()
    for item in docs:
        doc, score = item if isinstance(item, tuple) else (item, None)
        passage = document_to_passage(doc, score)
        if passage.id in seen:
            continue
        seen.add(passage.id)
        passages.append(passage)
        sources.append(passage_to_document(passage))
    return passages, sources


def passage_to_document(passage: Passage) -> Document:
    """The inverse adapter: a ``Document`` whose ``id`` is the passage id."""
    metadata: dict[str, Any] = dict(passage.metadata)
    if passage.title is not None and not any(metadata.get(k) for k in TITLE_KEYS):
        metadata["title"] = passage.title
    return Document(id=passage.id, page_content=passage.text, metadata=metadata)


def span_to_citation(span: Span) -> Citation:
    """A standard ``Citation``: ``answer[start_index:end_index] == cited_text ==
    page_content[src_start:src_end]`` (the decoder's span invariant).

    The id is derived from the span, not random, so a streamed answer and an invoked answer
    carry identical citations. ``extras["kind"]`` is the span's kind (copied or matched).
    """
    passage = span.passage
    source = passage.metadata.get("source")
    return create_citation(
        id=f"nest-{span.out_start}-{span.out_end}-{passage.id}",
        url=None if source is None else str(source),
        title=passage.title,
        start_index=span.out_start,
        end_index=span.out_end,
        cited_text=span.text,
        doc_id=passage.id,
        src_start=span.src_start,
        src_end=span.src_end,
        kind=span.kind,
    )


def spans_to_citations(spans: Sequence[Span]) -> list[Citation]:
    return [span_to_citation(s) for s in spans]


def result_citations(result: NestResult) -> list[Citation]:
    """Citations for the copied spans and the matched spans of ``result``, in answer order."""
    return spans_to_citations(result.cited_spans())


def format_citations(answer: str, citations: Sequence[Citation]) -> str:
    """The answer with ``[n]`` after each copied span and ``[~n]`` after each matched one
    (as :mod:`nest_core.app.render` marks them; adjacent spans of one document get one mark,
    ``[~n]`` only when all of them were matched), then one line per source document:
    ``[n] title (url): "cited text" ...`` (numbered in order of first citation)."""
    numbers: dict[str, int] = {}
    quotes: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    marks: list[tuple[int, int, str, bool]] = []  # (start, end, document, matched)
    for c in sorted(citations, key=lambda c: int(c.get("start_index", 0))):
        key = str(c.get("extras", {}).get("doc_id") or c.get("url") or c.get("title"))
        numbers.setdefault(key, len(numbers) + 1)
        matched = c.get("extras", {}).get("kind") == "matched"
        start, end = int(c.get("start_index", 0)), int(c.get("end_index", 0))
        if marks and marks[-1][2] == key and not answer[marks[-1][1]:start].strip():
            # adjacent stretches of one document ("G" + "hent office"): one mark, after both
            marks[-1] = (marks[-1][0], end, key, marks[-1][3] and matched)
        else:
            marks.append((start, end, key, matched))
        quotes.setdefault(key, []).append(f'"{c.get("cited_text", "")}"')
        title, url = c.get("title"), c.get("url")
        labels[key] = f"{title} ({url})" if title and url else str(title or url or key)
    out = answer
    for _, end, key, matched in sorted(marks, key=lambda m: m[1], reverse=True):
        n = numbers[key]
        out = out[:end] + (f"[~{n}]" if matched else f"[{n}]") + out[end:]
    lines = [f"[{n}] {labels[key]}: {' '.join(quotes[key])}" for key, n in numbers.items()]
    return "\n".join([out, "", *lines]).rstrip()


# --- documents given in the messages as content blocks ---------------------------------------
# LangChain's standard plain-text block, its file block, and Anthropic's document block.
DOCUMENT_BLOCK_TYPES = ("text-plain", "file", "document")
CITATIONS_ON = {"enabled": True}  # Anthropic's switch: cite this document


def documents_to_blocks(docs: Iterable[Document]) -> list[dict[str, Any]]:
    """Documents as content blocks that citation-capable chat models read and cite: put them
    in a ``HumanMessage`` beside the question.

    Each is LangChain's standard ``text-plain`` block (``create_plaintext_block``) with
    ``title``, ``url`` (the ``source``), the rest of the metadata in ``extras``, and
    ``citations={"enabled": True}``: :class:`ChatNest` decodes over it and cites it, and
    ``ChatAnthropic`` sends it as the Anthropic document block ``{"type": "document",
    "source": {"type": "text", "media_type": "text/plain", "data": ...}, "title": ...,
    "citations": {"enabled": True}}`` and answers with citations of it (it copies
    ``title``, ``context`` and ``citations`` over). The block ``id`` is the document's stable
    id, so citations name the same document as a retriever would."""
    from langchain_core.messages.content import create_plaintext_block

    blocks: list[dict[str, Any]] = []
    for doc in docs:
        passage = document_to_passage(doc)
        source = doc.metadata.get("source")
        extras = {k: v for k, v in doc.metadata.items() if k not in TITLE_KEYS}
        block = dict(create_plaintext_block(text=doc.page_content, title=passage.title,
                                            id=passage.id,
                                            url=None if source is None else str(source)))
        block["citations"] = dict(CITATIONS_ON)
        if extras:
            block["extras"] = extras
        blocks.append(block)
    return blocks


def block_to_document(block: dict[str, Any]) -> Document:
    """A document block as a ``Document``: ``title``, ``url`` (as ``source``), ``context``
    and ``extras`` become metadata. Ids that ``create_plaintext_block`` invented (``lc_`` +
    a random uuid) are dropped so the content hash names the passage, stably across calls."""
    text = _block_text(block)
    metadata: dict[str, Any] = dict(block.get("extras") or {})
    metadata.pop("citations", None)  # a switch for the model, not a property of the document
    if block.get("title"):
        metadata["title"] = str(block["title"])
    if block.get("url"):
        metadata.setdefault("source", str(block["url"]))
    if block.get("context"):
        metadata["context"] = str(block["context"])
    block_id = block.get("id")
    doc_id = str(block_id) if block_id and not str(block_id).startswith("lc_") else None
    return Document(id=doc_id, page_content=text, metadata=metadata)


def _block_text(block: dict[str, Any]) -> str:
    """The plain text a document block holds inline: ``text`` (standard), ``base64`` of a
    ``text/*`` file, or an Anthropic ``source`` of type ``text`` (or ``content``, its
    text parts joined). Anything else (a URL, a file id, a PDF) is refused: Nest reads
    plain text only and fetches nothing."""
    source = block.get("source")
    if block.get("type") == "document" and isinstance(source, dict):
        if source.get("type") == "text" and isinstance(source.get("data"), str):
            return str(source["data"])
        if source.get("type") == "content" and isinstance(source.get("content"), list):
            parts = [p.get("text") for p in source["content"] if isinstance(p, dict)]
            return "\n\n".join(p for p in parts if isinstance(p, str))
        if source.get("type") == "base64" and _is_text(source.get("media_type")):
            return _decoded(str(source.get("data", "")))
    elif isinstance(block.get("text"), str):
        return str(block["text"])
    elif block.get("base64") and _is_text(block.get("mime_type")):
        return _decoded(str(block["base64"]))
    msg = (f"a {block.get('type')!r} content block needs its document as inline plain text "
           f"('text', base64 of a text/plain file, or an Anthropic document whose source "
           f"type is 'text'); got keys {sorted(block)}. Nest cannot fetch 'url', 'file_id' "
           f"documents or read PDFs: pass the text itself")
    raise TypeError(msg)


def _is_text(mime_type: Any) -> bool:
    return isinstance(mime_type, str) and mime_type.startswith("text/")


def _decoded(data: str) -> str:
    import base64

    return base64.b64decode(data).decode("utf-8")


def blocks_to_documents(blocks: Iterable[Any]) -> list[Document]:
    """The documents among a message's content blocks (other blocks are skipped)."""
    return [block_to_document(b) for b in blocks
            if isinstance(b, dict) and b.get("type") in DOCUMENT_BLOCK_TYPES]
