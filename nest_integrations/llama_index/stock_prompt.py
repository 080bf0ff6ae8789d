"""Read the passages and the question back out of a stock LlamaIndex QA prompt.

Inside ``index.as_query_engine()`` the LLM only sees one formatted prompt. The stock
templates (text QA, tree summarize, refine) put the retrieved context between two lines of
dashes, and the question on a ``Query: ...`` line (refine: ``The original query is as
follows: ...``). Each node appears there as ``node.get_content(MetadataMode.LLM)``: its
metadata lines (``key: value``), a blank line, then its text.

:func:`context_nodes` turns that context back into nodes. A node the retrieval just returned
(the caller passes the candidates) whose text occurs verbatim in the context is cited as that
node, with its id, so spans point at the real ``source_node``. Context text that no candidate
covers (a custom template, a postprocessor that rewrote the text, a chunk the prompt helper
split) becomes a stand-in node ``context-<n>`` (the n-th uncovered paragraph, metadata lines
dropped), so it can still be copied from and cited, by position in the prompt.

The chat engines' condense prompts (``CondensePlusContextChatEngine``: ``Chat History:`` ...
``Follow Up Input:`` ... ``Standalone question:``; ``CondenseQuestionChatEngine``: the same
in ``<Chat History>`` / ``<Follow Up Message>`` / ``<Standalone question>`` sections) are read
back by :func:`parse_condense_prompt` into the history (``role: content`` lines, as
``messages_to_history_str`` writes them) and the follow-up.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.schema import NodeWithScore, TextNode

from nest_integrations.llama_index.nodes import node_text

# context between two lines of 5+ dashes (text QA: 21 dashes, refine: 12)
_CONTEXT = re.compile(r"^-{5,}[ \t]*\n(?P<context>.*?)\n-{5,}[ \t]*$", re.DOTALL | re.MULTILINE)
_QUERY = re.compile(r"(?:^|\n)Query:[ \t]*(?P<q>.+?)\s*\n\s*(?:Answer|Refined Answer):\s*$",
                    re.DOTALL)
_ORIGINAL_QUERY = re.compile(r"^The original query is as follows:[ \t]*(?P<q>.+)$",
                             re.MULTILINE)
_METADATA_LINE = re.compile(r"^[^\s:][^:\n]{0,60}: .*$")
_CONDENSE = (
    re.compile(r"Chat History:[ \t]*\n(?P<history>.*?)\n\s*Follow Up Input:[ \t]*"
               r"(?P<q>.*?)\s*\n\s*Standalone question:\s*$", re.DOTALL),
    re.compile(r"<Chat History>[ \t]*\n(?P<history>.*?)\n\s*<Follow Up Message>[ \t]*\n"
               r"(?P<q>.*?)\s*\n\s*<Standalone question>\s*$", re.DOTALL),
)
_ROLE_LINE = re.compile(r"^\s*(?P<role>" + "|".join(r.value for r in MessageRole)
                        + r"):[ \t]?(?P<content>.*)$")


@dataclass(frozen=True)
class StockPrompt:
    """What a stock QA prompt holds: the user's question and the context block."""

    question: str
    context: str


def parse_stock_prompt(prompt: str) -> StockPrompt | None:
    """The question and context of a stock QA/refine prompt, or ``None`` for any other."""
    context = _CONTEXT.search(prompt)
    query = _QUERY.search(prompt) or _ORIGINAL_QUERY.search(prompt)
    if context is None or query is None:
        return None
    question = query.group("q").strip()
    return StockPrompt(question=question, context=context.group("context")) if question \
        else None


@dataclass(frozen=True)
class CondensePrompt:
    """What a stock condense prompt holds: the conversation so far and the follow-up."""

    history: list[ChatMessage]
    message: str


def parse_condense_prompt(prompt: str) -> CondensePrompt | None:
    """The history and follow-up of a stock chat engine's condense prompt, else ``None``."""
    for pattern in _CONDENSE:
        found = pattern.search(prompt)
        if found and found.group("q").strip():
            return CondensePrompt(history=_history(found.group("history")),
                                  message=found.group("q").strip())
    return None


def _history(text: str) -> list[ChatMessage]:
    """``role: content`` lines back into messages (a line without a role continues the
    message before it)."""
    messages: list[ChatMessage] = []
    for line in text.split("\n"):
        role = _ROLE_LINE.match(line)
        if role is not None:
            messages.append(ChatMessage(role=MessageRole(role.group("role")),
                                        content=role.group("content")))
        elif messages:
            messages[-1].content = f"{messages[-1].content}\n{line}"
    return messages


def context_nodes(context: str, candidates: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """The nodes of ``context`` in prompt order: candidates found verbatim, then stand-ins
    (``context-<n>``, score ``None``) for paragraphs no candidate covers."""
    found: list[tuple[int, int, NodeWithScore]] = []
    seen: set[str] = set()
    for scored in candidates:
        text = node_text(scored)
        if scored.node.node_id in seen or not text.strip():
            continue
        at = context.find(text)
        if at >= 0:
            seen.add(scored.node.node_id)
            found.append((at, at + len(text), scored))
    found.sort(key=lambda f: f[0])
    out: list[tuple[int, NodeWithScore]] = [(at, scored) for at, _, scored in found]
    for n, (at, piece) in enumerate(_uncovered(context, [(a, b) for a, b, _ in found]), 1):
        node = TextNode(id_=f"context-{n}", text=piece, metadata={"prompt_offset": at})
        out.append((at, NodeWithScore(node=node, score=None)))
    return [scored for _, scored in sorted(out, key=lambda o: o[0])]


def _uncovered(context: str, covered: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """Paragraphs of ``context`` outside ``covered`` ranges that are not metadata lines."""
    pieces, pos = [], 0
    for start, end in [*sorted(covered), (len(context), len(context))]:
        if start > pos:
            pieces.extend(_paragraphs(context, pos, start))
        pos = max(pos, end)
    return pieces


def _paragraphs(context: str, start: int, end: int) -> list[tuple[int, str]]:
    out = []
    for match in re.finditer(r"(?:(?!\n\s*\n).)+", context[start:end], re.DOTALL):
        lines = [ln for ln in match.group(0).split("\n") if ln.strip()]
        text = match.group(0)
        if lines and not all(_METADATA_LINE.match(ln) for ln in lines):
            lead = len(text) - len(text.lstrip())
            out.append((start + match.start() + lead, text.strip()))
    return out
