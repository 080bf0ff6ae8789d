"""Where a LangChain app put the question and the passages, when it did not hand them to Nest.

Stock LangChain code pastes retrieved documents into the text of a message:
``create_stuff_documents_chain`` into the system message ("... Use the following pieces of
retrieved context ...\\n\\n{context}", the question in the human turn), the v1 RAG agent's
``@dynamic_prompt`` into a system prompt ("Use the following context in your response:
\\n\\n{docs}"), the classic templates into the human turn around a "Question:" line. Nest
needs the documents as passages (to copy and cite them) and the question alone (to search a
retriever and to focus): a 900-character prompt is no search query.

:func:`cut` splits one message's text into the pasted context and the rest;
:func:`find_in_messages` applies it to a conversation: the question is the last human turn's
(its labelled question line, else the short paragraph beside the pasted context, else the
whole turn), the pasted context of any system, human or tool message becomes passages
(paragraphs, in prompt order: the order the app's retriever ranked them), and the prompt to
decode keeps what is not pasted context. The heuristics are deliberately narrow: a message
counts as pasted context only when a label ("Context:", "Documents:") or an opening
paragraph that names and points at it ("the following context", "documents below")
introduces it, or when a labelled or question-mark question sits beside 80+ characters of
other text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from langchain_core.documents import Document

MIN_CONTEXT = 80  # characters of pasted text that make a context (nest_core's STUFFED_MIN_CONTEXT)
MAX_QUESTION = 500  # an unlabelled "question" longer than this is not one; its last paragraph is
PASTED_KEY = "pasted_in"  # metadata of a pasted passage: the role of the message it was in

# "Question: ...", "Q: ...", "Query:", "User question:", "Input:", "Human:" (a chat prompt
# rendered as one string) on a line of their own.
_QUESTION_LABEL = re.compile(
    r"^[ \t]*(?:(?:user[ \t]+)?(?:question|query)|q|input|human)[ \t]*:[ \t]*(.*)$",
    re.IGNORECASE | re.MULTILINE)
_CONTEXT_LABEL = re.compile(
    r"^[ \t]*(?:(?:retrieved[ \t]+)?context|documents?|sources?|background|passages?|excerpts?)"
    r"[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE)
# An opening paragraph announces pasted documents when it names them ("context",
# "documents", ...) and points at them ("the following", "below", "retrieved", or a closing
# ":"): "Use the following pieces of retrieved context", "Context information is below.";
# not "You give accurate information."
_CUE = re.compile(r"\b(?:context|documents?|sources?|passages?|excerpts?|information)\b",
                  re.IGNORECASE)
_POINTER = re.compile(r"\b(?:following|below|provided|given|retrieved|these)\b",
                      re.IGNORECASE)
_SEPARATOR = re.compile(r"^[ \t]*[-=*_~#]{3,}[ \t]*$")
_ANSWER_LABEL = re.compile(r"^[ \t]*[\w ]{0,20}(?:answer|response)[ \t]*:[ \t]*$", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}[ \t]+(\S.*)$")


@dataclass(frozen=True)
class Parts:
    """One message's text cut where a template pasted context into it."""

    context: str  # the pasted context; "" when the message has none
    question: str  # the question the text asks (the whole text when it has no context)
    kept: str  # the text without the context and the paragraph announcing it


def cut(text: str) -> Parts:
    """``text`` split into pasted context, question and the rest (see the module docstring)."""
    lines = _split_labels(text.splitlines(keepends=True))
    found = _context_lines(lines)
    if found is None:
        return Parts("", _labelled_question(text) or text.strip(), text)
    intro, start, end = found
    context = "".join(lines[start:end]).strip()
    before, announce, after = ("".join(lines[:intro]), "".join(lines[intro:start]),
                               "".join(lines[end:]))
    question = (_labelled_question(before + announce + after) or _unlabelled(after)
                or _unlabelled(before) or _unlabelled(announce))
    return Parts(context, question, (before + after).strip())


def _split_labels(lines: list[str]) -> list[str]:
    """"Context: text" lines as "Context:" and "text", so a label always ends its line."""
    out = []
    for line in lines:
        label = _CONTEXT_LABEL.match(line)
        if label and line[label.end():].strip():
            out += [line[:label.end()].rstrip() + "\n", line[label.end():]]
        else:
            out.append(line)
    return out


def _context_lines(lines: list[str]) -> tuple[int, int, int] | None:
    """(first line announcing the context, first line of it, line after it), or None."""
    found = _context_start(lines)
    if found is None:
        return None
    intro, start = found
    end = _context_end(lines, start)
    if len("".join(lines[start:end]).strip()) < MIN_CONTEXT:
        return None
    return intro, start, end


def _context_start(lines: list[str]) -> tuple[int, int] | None:
    """(first line announcing the context, its first line): after an opening paragraph that
    announces it (names and points at it), after a context label, after an opening
    question line, or from the start when a last paragraph asks; None otherwise."""
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return None
    end = _paragraph_end(lines, first)
    opening = "".join(lines[first:end])
    announces = _CUE.search(opening) and (_POINTER.search(opening)
                                          or opening.rstrip().endswith(":"))
    if _QUESTION_LABEL.match(lines[first]) or announces:
        body = _skip_blank(lines, end)
        if body < len(lines):
            return first, body
    label = next((i for i, line in enumerate(lines) if _CONTEXT_LABEL.match(line)), None)
    if label is not None:
        return label, label + 1
    last = _last_paragraph(lines)
    if last > first and _asks("".join(lines[last:])):
        return first, first
    return None


def _context_end(lines: list[str], start: int) -> int:
    """The line after the context: the first closing separator or the last question label
    after it, a last paragraph that asks, or else the end (trailing "Answer:" lines out)."""
    closing = [i for i in range(start + 1, len(lines)) if _SEPARATOR.match(lines[i])]
    asked = [i for i in range(start + 1, len(lines)) if _QUESTION_LABEL.match(lines[i])]
    if closing or asked:
        return min(closing[:1] + asked[-1:])
    end = len(lines)
    while end > start and (not lines[end - 1].strip() or _ANSWER_LABEL.match(lines[end - 1])):
        end -= 1
    last = _last_paragraph(lines[:end])
    if last > start and _asks("".join(lines[last:end])):
        return last
    return end


def _paragraph_end(lines: list[str], first: int) -> int:
    """The line after the paragraph at ``first``: a blank or separator line, or the line
    after one that ends with ":" ("Use the following context:")."""
    for i in range(first, len(lines)):
        if not lines[i].strip() or _SEPARATOR.match(lines[i]):
            return i
        if lines[i].rstrip().endswith(":") and not _QUESTION_LABEL.match(lines[i]):
            return i + 1
    return len(lines)


def _skip_blank(lines: list[str], i: int) -> int:
    while i < len(lines) and (not lines[i].strip() or _SEPARATOR.match(lines[i])):
        i += 1
    return i


def _last_paragraph(lines: list[str]) -> int:
    """The first line of the last paragraph (answer labels at the end ignored)."""
    end = len(lines)
    while end > 0 and (not lines[end - 1].strip() or _ANSWER_LABEL.match(lines[end - 1])):
        end -= 1
    i = end
    while i > 0 and lines[i - 1].strip() and not _SEPARATOR.match(lines[i - 1]):
        i -= 1
    return i


def _asks(paragraph: str) -> bool:
    text = paragraph.strip()
    return bool(_QUESTION_LABEL.match(text)) or (text.endswith("?") and len(text) <= MAX_QUESTION)


def _labelled_question(text: str) -> str | None:
    """The rest of the last question-labelled line, or the lines after a bare label."""
    found = list(_QUESTION_LABEL.finditer(text))
    if not found:
        return None
    last = found[-1]
    if last.group(1).strip():
        return last.group(1).strip()
    words = []
    for line in text[last.end():].lstrip("\n").splitlines():
        if not line.strip() or _ANSWER_LABEL.match(line) or _CONTEXT_LABEL.match(line):
            break
        words.append(line.strip())
    return " ".join(words) or None


def _unlabelled(text: str) -> str:
    """A question without a label: ``text`` without answer labels, or its last paragraph
    when the whole is too long to be one question."""
    lines = [ln for ln in text.splitlines(keepends=True) if not _ANSWER_LABEL.match(ln)]
    question = "".join(lines).strip()
    if len(question) > MAX_QUESTION:
        question = "".join(lines[_last_paragraph(lines):]).strip()
    return question


def paragraphs(context: str, role: str) -> list[Document]:
    """Pasted context as passages: its paragraphs (a heading paragraph joins the next one
    and titles it), in order. They have no source: the prompt does not say where from."""
    docs: list[Document] = []
    heading: str | None = None
    for block in re.split(r"\n[ \t]*\n+", context.strip()):
        text = "\n".join(ln for ln in block.splitlines() if not _SEPARATOR.match(ln)).strip()
        if not text:
            continue
        title = _HEADING.match(text)
        if title and "\n" not in text:  # a heading alone: it titles the next paragraph
            heading = title.group(1).strip()
            continue
        metadata = {PASTED_KEY: role} | ({"title": heading} if heading else {})
        docs.append(Document(page_content=text, metadata=metadata))
    return docs


@dataclass(frozen=True)
class Found:
    """What a conversation holds besides the documents given to Nest (see the module)."""

    question: str  # the last human turn's question: what a retriever searches
    pasted: list[Document] = field(default_factory=list)  # pasted context, as passages
    prompt: list[dict[str, str]] = field(default_factory=list)  # as given
    reduced: list[dict[str, str]] = field(default_factory=list)  # pasted context removed


def find_in_prompt(prompt: Sequence[dict[str, str]]) -> Found:
    """:class:`Found` for ``{"role", "content"}`` messages (assistant turns left as they are;
    a tool message's whole text is context: what a retrieval tool returned)."""
    users = [i for i, m in enumerate(prompt) if m["role"] == "user" and m["content"].strip()]
    last_user = users[-1] if users else None
    pasted: list[Document] = []
    reduced: list[dict[str, str]] = []
    question = ""
    for i, m in enumerate(prompt):
        role, text = m["role"], m["content"]
        if role == "assistant":
            reduced.append(dict(m))
            continue
        if role == "tool":
            pasted += paragraphs(text, role) if len(text.strip()) >= MIN_CONTEXT else []
            reduced.append(dict(m))
            continue
        parts = cut(text)
        pasted += paragraphs(parts.context, role) if parts.context else []
        if i == last_user:
            question = parts.question
            reduced.append({"role": role, "content": parts.question if parts.context else text})
        elif parts.kept or not parts.context:
            reduced.append({"role": role, "content": parts.kept if parts.context else text})
        if last_user is None and parts.context and not question:
            question = parts.question  # no human turn: the system prompt asks ("...colors:")
    if last_user is None and not question and prompt:
        question = prompt[-1]["content"].strip()
    return Found(question, pasted, [dict(m) for m in prompt], reduced)


def find_in_text(text: str) -> Found:
    """:class:`Found` for a single prompt string (``NestLLM``): one human turn."""
    return find_in_prompt([{"role": "user", "content": text}])
