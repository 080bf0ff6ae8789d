"""Turn a follow-up message into a standalone question, deterministically.

``CondenseQuestionChatEngine`` asks its LLM to rewrite the follow-up. The bundled 135M model
rewrites unreliably (it answers the question, or drops the subject), and a wrong rewrite
retrieves the wrong passages, so :class:`~nest_integrations.llama_index.NestChatEngine`
condenses with a rule instead: the pronouns of the follow-up (``it``, ``its``, ``they``...)
are replaced by the subject of the conversation, the longest run of capitalised words in the
latest earlier user message that has one (else in the latest answer). "Who founded Halvorsen
Orchard Robotics?" then "And where is it located?" gives "Where is Halvorsen Orchard
Robotics located?". A message with no pronoun, or a conversation with no named subject, is
kept as it is. Pass your own ``condense_question`` (for example one that calls a larger LLM)
to the chat engine to replace this rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from llama_index.core.base.llms.types import ChatMessage, MessageRole

CondenseFn = Callable[[Sequence[ChatMessage], str], str]

# Words that start a question or a sentence: capitalised, but never a subject.
_NOT_NAMES = frozenset([
    "a", "an", "and", "are", "can", "could", "did", "do", "does", "how", "i", "in", "is", "it",
    "its", "on", "or", "so", "the", "their", "they", "this", "was", "what", "when", "where",
    "which", "who", "whom", "whose", "why", "will", "with", "would"])
# Subject pronouns -> the name; possessives -> the name's.
_PRONOUNS = {"it": "{}", "they": "{}", "them": "{}", "he": "{}", "she": "{}", "him": "{}",
             "its": "{}'s", "their": "{}'s", "his": "{}'s", "her": "{}'s"}
_LEADING = re.compile(r"^\s*(?:and|so|also|then|ok(?:ay)?|but)\b[\s,]*", re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z][\w'&.-]*")
_PRONOUN = re.compile(r"\b(" + "|".join(_PRONOUNS) + r")\b", re.IGNORECASE)


def subject_of(text: str) -> str | None:
    """The longest run of capitalised words in ``text`` (the last one on a tie), or None."""
    runs: list[list[str]] = [[]]
    for word in _WORD.findall(text):
        word = word.rstrip(".'")
        if word[:1].isupper() and word.lower() not in _NOT_NAMES:
            runs[-1].append(word)
        elif runs[-1]:
            runs.append([])
    best = max(reversed(runs), key=len)  # reversed: max keeps the first, i.e. the last run
    return " ".join(best) or None


def conversation_subject(history: Sequence[ChatMessage]) -> str | None:
    """The subject of the latest user message that names one, else of the latest answer."""
    for role in (MessageRole.USER, MessageRole.ASSISTANT):
        for message in reversed(history):
            if message.role == role and (name := subject_of(message.content or "")):
                return name
    return None


def condense_question(history: Sequence[ChatMessage], message: str) -> str:
    """``message`` as a standalone question, given the earlier ``history``."""
    if not history or not _PRONOUN.search(message):
        return message
    name = conversation_subject(history)
    if name is None:
        return message
    possessive = name + ("'" if name.endswith("s") else "'s")

    def replace(match: re.Match[str]) -> str:
        pattern = _PRONOUNS[match.group(1).lower()]
        return possessive if pattern.endswith("'s") else name

    question = _PRONOUN.sub(replace, _LEADING.sub("", message), count=1)
    return question[:1].upper() + question[1:]
