"""LlamaIndex nodes -> nest :class:`Passage` objects, and back to attribution dicts.

Passage ids are the node ids: they are stable across queries (the key cache and the span
datastore are keyed on them) and they let every citation point at a ``source_node``.
LlamaIndex's private bookkeeping (``_node_content``, ``_node_type``... written into vector
store metadata, visible when a collection was built by another tool or another version)
is stripped: it is a serialised copy of the node, not something to cite.

A passage's title is its citation label. Nodes read by ``SimpleDirectoryReader`` have no
``title`` but a ``file_name`` (and ``file_path``): that names the source a reader can open,
where the node id (a UUID) names nothing, so it is the label when no title is set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from llama_index.core.schema import MetadataMode, NodeWithScore

from nest_core.types import Passage, Span

logger = logging.getLogger(__name__)


def public_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metadata`` without ``_``-prefixed keys (LlamaIndex's serialised node and type)."""
    return {k: v for k, v in (metadata or {}).items() if not str(k).startswith("_")}


def node_text(scored: NodeWithScore) -> str:
    """The node's own text, without metadata: span source offsets index exactly this."""
    return scored.node.get_content(metadata_mode=MetadataMode.NONE) or ""


def nodes_to_passages(nodes: Sequence[NodeWithScore], *, title_key: str | None = "title",
                      ) -> tuple[list[Passage], list[NodeWithScore]]:
    """Convert retrieved nodes to passages; return them with the nodes that were kept.

    Nodes without text (an ``ImageNode`` with no caption, an empty chunk) cannot be copied
    from, so they are skipped with a warning; duplicates of a node id keep the first (best
    ranked) copy. The two returned lists are aligned: ``kept[i]`` produced ``passages[i]``.
    """
    passages: list[Passage] = []
    kept: list[NodeWithScore] = []
    seen: set[str] = set()
    for scored in nodes:
        node = scored.node
        text = node_text(scored)
        if not text.strip():
            logger.warning("skipping node %s (%s): it has no text for Nest to copy from",
                           node.node_id, type(node).__name__)
            continue
        if node.node_id in seen:
            continue
        seen.add(node.node_id)
        metadata = public_metadata(node.metadata)
        title = source_title(metadata, title_key)
        metadata["node_id"] = node.node_id
        if node.ref_doc_id is not None:
            metadata["ref_doc_id"] = node.ref_doc_id
        passages.append(Passage(id=node.node_id, text=text, title=title,
                                metadata=metadata, score=scored.score))
        kept.append(scored)
    return passages, kept


def source_title(metadata: Mapping[str, Any], title_key: str | None = "title") -> str | None:
    """The label of a node: ``metadata[title_key]``, else its ``file_name``, else the last
    part of its ``file_path`` (what LlamaIndex's readers write); ``None`` when it has none.
    Only non-empty strings count."""
    title = metadata.get(title_key) if title_key else None
    if isinstance(title, str) and title:
        return title
    name = metadata.get("file_name")
    if isinstance(name, str) and name:
        return name
    path = metadata.get("file_path")
    if isinstance(path, str) and PurePath(path).name:
        return PurePath(path).name
    return None


def span_dict(span: Span, scored: NodeWithScore, source_index: int, *, out_start: int,
              out_end: int) -> dict[str, Any]:
    """The ``Response.metadata["nest_spans"]`` entry for one copied span, or the
    ``metadata["nest_matches"]`` entry for one matched span (``kind`` says which).

    ``out_start``/``out_end`` index the response text as returned (with markers, if any);
    ``src_start``/``src_end`` index the node text; ``doc_start``/``doc_end`` index the
    source document and are present only when the node knows its ``start_char_idx``.
    ``source_index`` is the 1-based position in ``source_nodes`` (the ``[n]`` marker).
    """
    node = scored.node
    out: dict[str, Any] = {
        "out_start": out_start,
        "out_end": out_end,
        "node_id": node.node_id,
        "ref_doc_id": node.ref_doc_id,
        "source_index": source_index,
        "cited_text": span.text,
        "src_start": span.src_start,
        "src_end": span.src_end,
        "token_start": span.token_start,
        "token_end": span.token_end,
        "title": span.passage.title,
        "kind": span.kind,
    }
    start_idx = getattr(node, "start_char_idx", None)
    if isinstance(start_idx, int):
        out["doc_start"] = start_idx + span.src_start
        out["doc_end"] = start_idx + span.src_end
    return out


def response_metadata(kept: Sequence[NodeWithScore]) -> dict[str, Any]:
    """The stock engines' ``{node_id: node.metadata}`` (public keys only) plus our lists:
    ``nest_spans`` (copied) and ``nest_matches`` (matched), filled while decoding."""
    meta: dict[str, Any] = {s.node.node_id: public_metadata(s.node.metadata) for s in kept}
    meta["nest_spans"] = []
    meta["nest_matches"] = []
    return meta
