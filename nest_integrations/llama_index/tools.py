"""``NestQueryEngineTool``: a ``QueryEngineTool`` whose output shows the sources it cites.

A stock ``QueryEngineTool`` hands the agent ``str(response)``: the answer text alone, so the
agent (and the user reading its trace) cannot tell where any of it came from. This tool's
``ToolOutput.content`` is the answer followed by a ``Sources:`` block listing each cited
node once, with the exact text copied from it; ``ToolOutput.raw_output`` is the full
``Response`` (``source_nodes``, ``metadata["nest_spans"]``, ``metadata["nest_matches"]``) for
code that wants the structured form.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.response.schema import RESPONSE_TYPE
from llama_index.core.tools import QueryEngineTool, ToolOutput

from nest_integrations.llama_index.query_engine import NestQueryEngine

LABEL_KEYS = ("file_name", "source", "title")  # the first a node has names it


def source_label(metadata: dict[str, Any], node_id: str) -> str:
    """A short human name for a node: its file name, source or title, else its id."""
    for key in LABEL_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return f"node {node_id}"


def format_sources(response: RESPONSE_TYPE) -> str:
    """``"<answer>\\n\\nSources:\\n[n] label: "copied text" ..."`` (the answer alone when
    nothing was cited). ``n`` is the node's position in ``source_nodes``."""
    text = str(response)
    metadata = response.metadata or {}
    spans = [*metadata.get("nest_spans", []), *metadata.get("nest_matches", [])]
    cited: dict[int, list[str]] = {}
    for span in sorted(spans, key=lambda s: s["out_start"]):
        quotes = cited.setdefault(span["source_index"], [])
        if span["cited_text"].strip() and span["cited_text"] not in quotes:
            quotes.append(span["cited_text"])
    if not cited:
        return text
    lines = [text, "", "Sources:"]
    for index in sorted(cited):
        node = response.source_nodes[index - 1].node
        quoted = " ... ".join(f'"{q.strip()}"' for q in cited[index])
        lines.append(f"[{index}] {source_label(node.metadata, node.node_id)}: {quoted}")
    return "\n".join(lines)


class NestQueryEngineTool(QueryEngineTool):
    """``QueryEngineTool`` over a :class:`NestQueryEngine`; the output cites its sources.

    ``NestQueryEngineTool.from_defaults(engine, name=..., description=...)`` as for the stock
    tool. The engine must not stream (a tool returns a finished answer).
    """

    def __init__(self, query_engine: NestQueryEngine, *args: Any, **kwargs: Any) -> None:
        if not isinstance(query_engine, NestQueryEngine):
            msg = (f"query_engine must be a NestQueryEngine, got "
                   f"{type(query_engine).__name__}; use QueryEngineTool for other engines")
            raise TypeError(msg)
        if query_engine.streaming:
            msg = ("NestQueryEngineTool needs a finished answer; build the engine with "
                   "streaming=False")
            raise ValueError(msg)
        super().__init__(query_engine, *args, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return _with_sources(super().call(*args, **kwargs))

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        return _with_sources(await super().acall(*args, **kwargs))


def _with_sources(output: ToolOutput) -> ToolOutput:
    return ToolOutput(content=format_sources(output.raw_output),
                      tool_name=output.tool_name, raw_input=output.raw_input,
                      raw_output=output.raw_output)


__all__ = ["NestQueryEngineTool", "format_sources"]
