"""The OpenAI legacy text completions wire format (``POST /v1/completions``).

``prompt`` (one string) is read as one user message, as :meth:`NestDecoder.generate` reads
a string prompt; ``max_tokens``, ``stop``, ``stream`` (with ``stream_options``) and the
``truncation`` extension are those of the chat route. A ``text_completion`` has no
standard place for citations: they travel in the ``nest`` extension field, as on the chat
route (top level of the response, and of the stream chunk with ``finish_reason``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from nest_core.app.openai_api import (
    UNSUPPORTED,
    ApiError,
    ChatRequest,
    check_body,
    check_greedy,
    extension,
    finish_reason,
    max_tokens_of,
    parse_stops,
    sse,
    truncation,
    usage,
)
from nest_core.types import NestResult, Passage

REFUSED = {  # options of the legacy route Nest cannot honour
    "echo": "Nest returns the answer only; prepend the prompt yourself",
    "suffix": "Nest does not insert text between a prompt and a suffix",
    "logit_bias": "Nest decodes greedily from its own mixture",
}


def parse_request(body: Any, *, model_ids: tuple[str, ...], max_tokens_limit: int,
                  default_max_tokens: int) -> ChatRequest:
    """Validate a legacy completion request body (errors as :class:`ApiError`)."""
    check_body(body, model_ids, {**UNSUPPORTED, **REFUSED})
    check_greedy(body)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of must be 1: Nest decodes one greedy answer",
                       param="best_of")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    return ChatRequest(messages=[{"role": "user", "content": prompt_of(body.get("prompt"))}],
                       max_tokens=max_tokens_of(body.get("max_tokens"), max_tokens_limit,
                                                default_max_tokens),
                       stop=parse_stops(body.get("stop")), stream=stream,
                       include_usage=bool(options.get("include_usage")),
                       truncate=truncation(body.get("truncation")))


def prompt_of(prompt: Any) -> str:
    """The one prompt string (a list of one string is accepted, as OpenAI accepts lists)."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "`prompt` must be one non-empty string (Nest answers one prompt "
                            "per request)", param="prompt")
    return prompt


def completion_id() -> str:
    return f"cmpl-nest-{uuid.uuid4().hex[:24]}"


def completion(result: NestResult, retrieved: list[Passage], model: str) -> dict[str, Any]:
    """A ``text_completion`` object with the ``nest`` extension."""
    return {"id": completion_id(), "object": "text_completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": finish_reason(result)}],
            "usage": usage(result), "nest": extension(result, retrieved)}


class CompletionStream:
    """``text_completion`` chunks: text as Nest accepts it, a last chunk with
    ``finish_reason`` and the ``nest`` citations, the usage chunk if asked, ``[DONE]``."""

    def __init__(self, request: ChatRequest, retrieved: list[Passage], model: str) -> None:
        self.request, self.retrieved, self.model = request, retrieved, model
        self.cid, self.created = completion_id(), int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse({"id": self.cid, "object": "text_completion", "created": self.created,
                    "model": self.model, "choices": choices, **extra})

    @staticmethod
    def _choice(text: str, finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def opening(self) -> list[str]:
        return []

    def text(self, piece: str) -> list[str]:
        return [self._chunk([self._choice(piece)])]

    def closing(self, result: NestResult) -> list[str]:
        out = [self._chunk([self._choice("", finish_reason(result))],
                           nest=extension(result, self.retrieved))]
        if self.request.include_usage:
            out.append(self._chunk([], usage=usage(result)))
        return [*out, sse("[DONE]")]

    def failure(self, err: ApiError) -> list[str]:
        return [sse(err.body())]
