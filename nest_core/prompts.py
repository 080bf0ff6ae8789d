"""Prompt assembly: background passages in the prompt (in-context RAG / RA-Nest) and the
context-window guard."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nest_core.lm import Message
from nest_core.types import Passage

logger = logging.getLogger(__name__)

BACKGROUND_INSTRUCTION = "Answer with the background context as reference."


def format_background(passages: Sequence[Passage]) -> str:
    return "\n\n".join(f"{p.title}: {p.text}" if p.title else p.text for p in passages)


def with_background(prompt: str | Sequence[Message], passages: Sequence[Passage],
                    repeat_question: bool = False) -> str | list[Message]:
    """The paper's RA prompt shape: instruction, background passages, then the request.

    ``repeat_question`` (beyond the paper, ``NestConfig.repeat_question``): the request,
    the background, then the request again. A small model that reads the background before
    it knows the question answers from the question's own words ("The ISO 3166-2 code of
    Rize is a province of Türkiye"); read knowing what it looks for, it takes the answer
    from the background ("... of Rize is TR-53").
    """
    if not passages:
        return prompt if isinstance(prompt, str) else list(prompt)
    background = f"Background:\n{format_background(passages)}"

    def wrap(request: str) -> str:
        if repeat_question:
            return f"{request}\n\n{background}\n\n{request}"
        return f"{BACKGROUND_INSTRUCTION}\n{background}\n\n{request}"

    if isinstance(prompt, str):
        return wrap(prompt)
    messages = [dict(m) for m in prompt]
    for m in reversed(messages):
        if m["role"] == "user":
            m["content"] = wrap(m["content"])
            break
    else:
        messages.append({"role": "user", "content": f"{BACKGROUND_INSTRUCTION}\n{background}"})
    return messages


def question_of(prompt: str | Sequence[Message]) -> str:
    """What the user asked: the prompt string, or the last user message with text ("" when
    no user message has any)."""
    if isinstance(prompt, str):
        return prompt
    return next((str(m["content"]) for m in reversed(prompt)
                 if m["role"] == "user" and str(m["content"]).strip()), "")


# "Question: ...", "Query: ...", "User question: ..." on a line of its own (the labels of the
# common RAG templates: LangChain's rag-prompt, LlamaIndex's text-QA template).
_QUESTION_LABEL = re.compile(r"^[ \t]*(?:user[ \t]+)?(?:question|query)[ \t]*:[ \t]*(.*)$",
                             re.IGNORECASE | re.MULTILINE)
_ANY_LABEL = re.compile(r"^[ \t]*[A-Za-z][\w ]{0,30}:", re.MULTILINE)
STUFFED_MIN_CONTEXT = 80  # characters around the question that make a prompt "stuffed"


def stuffed_question(text: str, min_context: int = STUFFED_MIN_CONTEXT) -> str | None:
    """The question inside a prompt template that also holds retrieved context
    ("Context: ... Question: ... Answer:"), or None when ``text`` is not such a prompt.

    Retrieving (and focusing) on the whole stuffed prompt searches for the context itself,
    not for what the user asked. The question is the rest of the last labelled line, or the
    lines after a bare label up to a blank line or the next label; ``text`` is a template
    only with at least ``min_context`` characters besides the question.
    """
    found = list(_QUESTION_LABEL.finditer(text))
    if not found:
        return None
    last = found[-1]
    question = last.group(1).strip()
    if not question:
        rest = text[last.end():].lstrip("\n")
        lines = []
        for line in rest.splitlines():
            if not line.strip() or _ANY_LABEL.match(line):
                break
            lines.append(line.strip())
        question = " ".join(lines)
    if not question or len(text) - len(question) < min_context:
        return None
    return question


@dataclass(frozen=True)
class Question:
    """Which part of a prompt is the question (:func:`find_question`)."""

    asked: str  # what the user asked: the prompt string, or the last user message with text
    stuffed: str | None  # the question a RAG template inside ``asked`` labels; None: no template

    @property
    def text(self) -> str:
        """What retrieval and the focus look for: the labelled question, else ``asked``."""
        return self.asked if self.stuffed is None else self.stuffed


def find_question(prompt: str | Sequence[Message],
                  min_context: int = STUFFED_MIN_CONTEXT) -> Question:
    """The one place that decides which part of a prompt is the question: the message
    (:func:`question_of`), then the question inside a stuffed template
    (:func:`stuffed_question`; ``min_context=0``: any labelled question counts)."""
    asked = question_of(prompt)
    return Question(asked, stuffed_question(asked, min_context))


def with_question(prompt: str | Sequence[Message], question: str) -> str | list[Message]:
    """``prompt`` with what the user asked reduced to ``question``: the string itself, or
    the last user message of a conversation (for a stuffed prompt whose passages Nest has:
    it shows their best sentences itself, instead of a second, unfocused copy)."""
    if isinstance(prompt, str):
        return question
    messages = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if users:
        messages[users[-1]]["content"] = question
    return messages


def fit_context(prompt_ids: list[int], max_new_tokens: int, max_context: int
                ) -> tuple[list[int], bool]:
    """Left-truncate the prompt so prompt + answer fit the context window (with a warning)."""
    room = max_context - max_new_tokens
    if room < 1:
        msg = (f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
               f"{max_context}-token context window; lower max_new_tokens")
        raise ValueError(msg)
    if len(prompt_ids) <= room:
        return prompt_ids, False
    logger.warning("prompt of %d tokens + max_new_tokens=%d exceeds the %d-token context "
                   "window: keeping the last %d prompt tokens", len(prompt_ids),
                   max_new_tokens, max_context, room)
    return prompt_ids[-room:], True
