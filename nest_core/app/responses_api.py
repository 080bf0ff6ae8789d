"""The OpenAI Responses API wire format (``POST /v1/responses``), for ``nest serve``.

A request becomes the same :class:`~nest_core.app.openai_api.ChatRequest` the chat route
decodes: ``instructions`` is the system message, ``input`` a string (one user message) or a
list of message items whose content is a string or ``input_text``/``output_text`` parts.
Nest holds no conversation state: ``previous_response_id``, ``conversation``, ``background``
and tools are refused (400), ``store`` is accepted and nothing is stored.

The answer is one ``message`` output item with one ``output_text`` part whose
``annotations`` are ``url_citation`` objects (``start_index``, ``end_index``, ``url``,
``title``): the citations of :meth:`~nest_core.types.NestResult.cited_spans`. The response
object also carries the ``nest`` extension of the chat route. Streamed, the events are
those OpenAI sends, each with its ``sequence_number``: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` per accepted piece, then, once the answer is known,
``response.output_text.annotation.added`` per citation, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` and ``response.completed``
(``response.incomplete`` when ``max_output_tokens`` cut the answer).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from nest_core.app.openai_api import (
    UNSUPPORTED,
    ApiError,
    ChatRequest,
    chat_messages,
    check_body,
    check_greedy,
    extension,
    max_tokens_of,
    sse,
    truncation,
    url_citations,
)
from nest_core.types import NestResult, Passage

REFUSED = {  # stateful or tool features Nest does not have
    "previous_response_id": "Nest stores no responses; send the whole conversation as `input`",
    "conversation": "Nest stores no conversations; send the whole conversation as `input`",
    "background": "Nest answers in the request; leave `background` out",
    "prompt": "Nest has no stored prompts; send the text as `input`",
    "reasoning": "Nest's model does not reason apart from its answer",
}
TEXT_PARTS = ("input_text", "output_text", "text")


def parse_request(body: Any, *, model_ids: tuple[str, ...], max_tokens_limit: int,
                  default_max_tokens: int, max_messages: int) -> ChatRequest:
    """Validate a Responses API request body (errors as :class:`ApiError`)."""
    check_body(body, model_ids, {**UNSUPPORTED, **REFUSED})
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) \
        else None
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "`text.format` is not supported: Nest decodes text (and cites "
                            "it) token by token; parse the answer text instead",
                       param="text.format")
    check_greedy(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    return ChatRequest(messages=chat_messages(input_messages(body), max_messages),
                       max_tokens=max_tokens_of(body.get("max_output_tokens"), max_tokens_limit,
                                                default_max_tokens, "max_output_tokens"),
                       stop=[], stream=stream, include_usage=False,
                       truncate=truncation(body.get("truncation")))


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages (checked further by the chat rules)."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "`input` must be a string or a non-empty list of messages",
                       param="input")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError(400, "`instructions` must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise ApiError(400, f"input[{i}] is a {kind!r} item: Nest reads message items "
                                f"only", param=f"input[{i}]")
        messages.append({"role": item.get("role"), "content": _content(item.get("content"), i)})
    return messages


def _content(content: Any, i: int) -> Any:
    """A message item's content as the chat route reads it (text parts as ``text``)."""
    if not isinstance(content, list):
        return content
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ApiError(400, f"input[{i}].content: a {kind!r} part; Nest reads text parts "
                                f"only", param=f"input[{i}].content")
        parts.append({"type": "text", "text": part.get("text")})
    return parts


# --- responses ----------------------------------------------------------------------------------
def response_id() -> str:
    return f"resp_nest{uuid.uuid4().hex}"


def output_annotations(result: NestResult) -> list[dict[str, Any]]:
    """The Responses API's flat ``url_citation`` annotations of the answer's citations."""
    return [{"type": "url_citation", **a["url_citation"]} for a in url_citations(result)]


def usage(result: NestResult) -> dict[str, Any]:
    prompt, output = int(result.stats.prompt_tokens), len(result.token_ids)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output}


class Response:
    """One response object as it grows: created, in progress, then completed from the
    result (ids and times fixed at the start so every event names the same response)."""

    def __init__(self, request: ChatRequest, retrieved: list[Passage], model: str) -> None:
        self.request, self.retrieved, self.model = request, retrieved, model
        self.id, self.item_id = response_id(), f"msg_nest{uuid.uuid4().hex}"
        self.created = int(time.time())

    def body(self, result: NestResult | None = None) -> dict[str, Any]:
        """The ``response`` object: in progress (no output) before ``result``."""
        system = [m["content"] for m in self.request.messages if m["role"] == "system"]
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": "in_progress", "error": None, "incomplete_details": None,
            "instructions": system[0] if system else None,
            "max_output_tokens": self.request.max_tokens, "model": self.model, "output": [],
            "parallel_tool_calls": False, "temperature": 0.0, "tool_choice": "none",
            "tools": [], "top_p": 1.0, "text": {"format": {"type": "text"}},
            "truncation": "auto" if self.request.truncate else "disabled",
            "metadata": {}, "usage": None}
        if result is None:
            return out
        cut = result.finish_reason == "length"
        return {**out, "status": "incomplete" if cut else "completed",
                "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                "output": [self.item(result)], "usage": usage(result),
                "nest": extension(result, self.retrieved)}

    def item(self, result: NestResult | None = None) -> dict[str, Any]:
        """The ``message`` output item (empty and in progress before ``result``)."""
        content = [self.part(result)] if result is not None else []
        return {"type": "message", "id": self.item_id, "role": "assistant",
                "status": "in_progress" if result is None else "completed",
                "content": content}

    @staticmethod
    def part(result: NestResult | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": result.text if result else "",
                "annotations": output_annotations(result) if result else [], "logprobs": []}


class ResponseStream:
    """The Responses API's streamed events for one answer (see the module docstring)."""

    def __init__(self, request: ChatRequest, retrieved: list[Passage], model: str) -> None:
        self.response = Response(request, retrieved, model)
        self.sequence = 0

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(payload, event=kind)

    def _in_part(self, kind: str, **fields: Any) -> str:
        return self._event(kind, item_id=self.response.item_id, output_index=0,
                           content_index=0, **fields)

    def opening(self) -> list[str]:
        r = self.response
        return [self._event("response.created", response=r.body()),
                self._event("response.in_progress", response=r.body()),
                self._event("response.output_item.added", output_index=0, item=r.item()),
                self._in_part("response.content_part.added", part=r.part())]

    def text(self, piece: str) -> list[str]:
        return [self._in_part("response.output_text.delta", delta=piece, logprobs=[])]

    def closing(self, result: NestResult) -> list[str]:
        r = self.response
        out = [self._in_part("response.output_text.annotation.added", annotation_index=i,
                             annotation=a) for i, a in enumerate(output_annotations(result))]
        body = r.body(result)
        final = "response.incomplete" if body["status"] == "incomplete" else \
            "response.completed"
        return [*out,
                self._in_part("response.output_text.done", text=result.text, logprobs=[]),
                self._in_part("response.content_part.done", part=r.part(result)),
                self._event("response.output_item.done", output_index=0,
                            item=r.item(result)),
                self._event(final, response=body)]

    def failure(self, err: ApiError) -> list[str]:
        return [self._event("error", code=err.code or err.type, message=err.message,
                            param=err.param)]
