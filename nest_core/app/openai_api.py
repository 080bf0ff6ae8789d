"""The OpenAI Chat Completions wire format, for ``nest serve``: requests in, responses out.

Pure functions over dicts, no web framework: every bad request becomes an :class:`ApiError`
with the status and the OpenAI error body (``{"error": {"message", "type", "param",
"code"}}``) that stock clients raise as their own exceptions.

Citations travel two ways. Each message carries standard ``annotations`` of type
``url_citation`` (``start_index``/``end_index`` into the content, ``title``, ``url``: see
:func:`url_of`), which the ``openai`` client parses; a stream sends them as OpenAI does, in
a delta of their own (``{"annotations": [...]}``) after the text and before the chunk with
``finish_reason`` (``chunk.choices[0].delta.model_extra["annotations"]`` in the ``openai``
client). Every one of them is a citation of :meth:`NestResult.cited_spans`, known once the
answer is. The full record is the extension field ``nest`` at the top level of the response
(and of the last stream chunk), which stock clients ignore and keep as an extra attribute
(``completion.model_extra["nest"]`` in the ``openai`` client)::

    "nest": {"citations": [{"kind": "copied" | "matched", "text", "start_index", "end_index",
                             "passage_id", "title", "source", "src_start", "src_end"}],
             "sources": [{"id", "title", "text", "metadata"}],   # the cited passages
             "retrieved": ["<passage id>", ...],                  # in retrieval order
             "abstained": false, "quoted": false, "prompt_truncated": false,
             "attribution_ratio": 0.4, "stats": {...}}

A prompt that does not fit the model's context window with ``max_tokens`` is refused (400,
the limit and the prompt's token count in the message) unless the request sends the
extension field ``"truncation": "auto"`` (the Responses API's own field): then the oldest
messages are dropped first (the system message and the last user message on stay), and
what still does not fit loses its head (``nest.prompt_truncated`` is then true).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from nest_core.types import NestResult, Passage

if TYPE_CHECKING:
    from nest_core.lm import LanguageModel

ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED = {  # request fields Nest cannot honour: refused, never silently ignored
    "tools": "Nest does not call tools; use `nest mcp` to give an agent Nest as a tool",
    "functions": "Nest does not call functions",
    "logprobs": "Nest does not return log probabilities",
    "audio": "Nest answers in text only",
}
MAX_STOPS = 4


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    messages: list[dict[str, str]]
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    truncate: bool = False  # drop the prompt's oldest messages when it does not fit


def check_body(body: Any, model_ids: tuple[str, ...], refused: dict[str, str]) -> None:
    """The checks every route starts with: a JSON object, a served model, none of the
    ``refused`` fields (name -> what to do instead)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model not in model_ids:
        raise ApiError(404, f"model {model!r} is not served here; use one of "
                            f"{list(model_ids)} (GET /v1/models)", param="model",
                       code="model_not_found")
    for name, why in refused.items():
        if body.get(name) not in (None, False, [], {}):
            raise ApiError(400, f"`{name}` is not supported: {why}", param=name)


def parse_request(body: Any, *, model_ids: tuple[str, ...], max_tokens_limit: int,
                  default_max_tokens: int, max_messages: int) -> ChatRequest:
    """Validate an OpenAI chat completion request body (see :class:`ApiError`)."""
    check_body(body, model_ids, UNSUPPORTED)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "`response_format` is not supported: Nest decodes text (and cites "
                            "it) token by token; parse the answer text instead",
                       param="response_format")
    check_greedy(body)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    return ChatRequest(
        messages=chat_messages(body.get("messages"), max_messages),
        max_tokens=max_tokens_of(body.get("max_completion_tokens", body.get("max_tokens")),
                                 max_tokens_limit, default_max_tokens),
        stop=parse_stops(body.get("stop")), stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        truncate=truncation(body.get("truncation")))


def truncation(value: Any) -> bool:
    """The ``truncation`` field (Responses API; an extension on the other routes): whether
    a prompt too long for the context window may lose its oldest messages."""
    if value not in (None, "auto", "disabled"):
        raise ApiError(400, f"truncation={value!r} must be \"auto\" or \"disabled\" (the "
                            f"default: a prompt past the context window is refused)",
                       param="truncation")
    return value == "auto"


def check_greedy(body: dict[str, Any]) -> None:
    temperature = body.get("temperature")
    if temperature not in (None, 0) or isinstance(temperature, bool):
        raise ApiError(400, f"temperature={temperature!r} is not supported: Nest decodes "
                            f"greedily (its verification and citations assume it); send 0 "
                            f"or leave it out", param="temperature")
    if body.get("n") not in (None, 1):
        raise ApiError(400, "n must be 1: Nest decodes one greedy answer", param="n")


def chat_messages(messages: Any, max_messages: int) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content}",
                       param="messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages: at most {max_messages} per request",
                       param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role, one of {list(ROLES)}",
                           param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text(m.get("content"), i)})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise ApiError(400, "no user message with text: ask a question", param="messages")
    return out


def _text(content: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def max_tokens_of(value: Any, limit: int, default: int, name: str = "max_tokens") -> int:
    """The answer's token budget: ``value`` checked against the server's ``limit``."""
    if value is None:
        return min(default, limit)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ApiError(400, f"{name}={value!r} must be an integer from 1 to {limit} "
                            f"(this server's limit)", param=name)
    return value


def parse_stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS \
            or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most "
                            f"{MAX_STOPS} of them", param="stop")
    return stops


def fit_window(lm: LanguageModel, request: ChatRequest) -> ChatRequest:
    """``request`` as it fits ``lm``'s context window with its ``max_tokens``: unchanged when
    it fits; with ``truncate``, without its oldest messages (the system message and the
    last user message on stay; the decoder cuts the head of what is still too long); else
    a 400 that states the limit and the prompt's token count. Counted on the messages as
    sent (the passages the decoder shows beside them are its own to fit)."""
    limit = lm.max_context - request.max_tokens
    if limit < 1:
        raise ApiError(400, f"max_tokens={request.max_tokens} leaves no room for a prompt in "
                            f"this model's {lm.max_context}-token context window",
                       param="max_tokens", code="context_length_exceeded")
    messages = request.messages
    count = len(lm.prompt_ids(messages))
    if count <= limit:
        return request
    if not request.truncate:
        raise ApiError(400, f"the prompt is {count} tokens; this model's context window is "
                            f"{lm.max_context} tokens, which leaves at most {limit} prompt "
                            f"tokens with max_tokens={request.max_tokens}: shorten the "
                            f"prompt, lower max_tokens, or send \"truncation\": \"auto\" to "
                            f"drop its oldest messages", param="messages",
                       code="context_length_exceeded")
    first = 1 if messages[0]["role"] == "system" else 0
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    while count > limit and first < last_user:
        messages = messages[:first] + messages[first + 1:]  # the oldest after the system's
        last_user -= 1
        count = len(lm.prompt_ids(messages))
    return replace(request, messages=messages)


# --- responses -------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-nest-{uuid.uuid4().hex[:24]}"


def finish_reason(result: NestResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def url_of(passage: Passage) -> str:
    """An absolute URL for a passage: its ``source`` (or ``url``) metadata when that is a
    URL already (``https://...``, ``file://...``), else the ``file://`` URI of the source
    path (a relative one, as ``nest index`` records files under the folder it ran in, is
    taken from this process's working directory), else ``nest:passage/<id>``."""
    source = passage.metadata.get("source") or passage.metadata.get("url") \
        or passage.metadata.get("file_path")
    if not source:
        return f"nest:passage/{passage.id}"
    source = str(source)
    if len(urlsplit(source).scheme) > 1:  # a URL (one letter is a Windows drive)
        return source
    return Path(source).expanduser().resolve().as_uri()


def url_citations(result: NestResult) -> list[dict[str, Any]]:
    """Standard ``url_citation`` annotations, one per cited span, in answer order."""
    return [{"type": "url_citation", "url_citation": {
        "start_index": s.out_start, "end_index": s.out_end,
        "title": s.passage.title or s.passage.id, "url": url_of(s.passage)}}
        for s in result.cited_spans()]


def extension(result: NestResult, retrieved: list[Passage]) -> dict[str, Any]:
    """The ``nest`` field: every citation with source offsets, and the cited passages."""
    cited = result.cited_spans()
    sources: dict[str, Passage] = {}
    for s in cited:
        sources.setdefault(s.passage.id, s.passage)
    return {
        "citations": [{"kind": s.kind, "text": s.text, "start_index": s.out_start,
                       "end_index": s.out_end, "passage_id": s.passage.id,
                       "title": s.passage.title, "source": url_of(s.passage),
                       "src_start": s.src_start, "src_end": s.src_end} for s in cited],
        "sources": [{"id": p.id, "title": p.title, "text": p.text,
                     "metadata": _jsonable(p.metadata)} for p in sources.values()],
        "retrieved": [p.id for p in retrieved],
        "abstained": result.abstained,
        "quoted": result.quoted,
        "prompt_truncated": result.prompt_truncated,
        "attribution_ratio": result.attribution_ratio,
        "stats": result.stats.to_dict(),
    }


def usage(result: NestResult) -> dict[str, int]:
    prompt, completion = int(result.stats.prompt_tokens), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion(result: NestResult, retrieved: list[Passage], model: str) -> dict[str, Any]:
    """A ``chat.completion`` object with the ``nest`` extension."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "logprobs": None, "finish_reason": finish_reason(result),
                     "message": {"role": "assistant", "content": result.text,
                                 "refusal": None, "annotations": url_citations(result)}}],
        "usage": usage(result),
        "nest": extension(result, retrieved),
    }


def chunk(cid: str, model: str, created: int, delta: dict[str, Any],
          finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``extra`` adds top-level fields (``nest``, ``usage``)."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}], **extra}


class EventStream(Protocol):
    """One wire format's server-sent events for one streamed answer (each an SSE string):
    the server calls ``opening``, ``text`` per accepted piece, ``closing`` with the result,
    or ``failure`` when the answer breaks off."""

    def opening(self) -> list[str]: ...

    def text(self, piece: str) -> list[str]: ...

    def closing(self, result: NestResult) -> list[str]: ...

    def failure(self, err: ApiError) -> list[str]: ...


def sse(payload: dict[str, Any] | str, event: str | None = None) -> str:
    """One server-sent event (``data: [DONE]`` for a string)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {data}\n\n"


class ChatStream:
    """The ``chat.completion.chunk`` events: a role delta, text deltas as Nest accepts
    them, the annotations delta (when there are citations), the chunk with
    ``finish_reason`` and the ``nest`` extension, the usage chunk if asked, ``[DONE]``."""

    def __init__(self, request: ChatRequest, retrieved: list[Passage], model: str) -> None:
        self.request, self.retrieved, self.model = request, retrieved, model
        self.cid, self.created = completion_id(), int(time.time())

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return sse(chunk(self.cid, self.model, self.created, delta, finish, **extra))

    def opening(self) -> list[str]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def text(self, piece: str) -> list[str]:
        return [self._chunk({"content": piece})]

    def closing(self, result: NestResult) -> list[str]:
        annotations = url_citations(result)
        out = [self._chunk({"annotations": annotations})] if annotations else []
        out.append(self._chunk({}, finish_reason(result),
                               nest=extension(result, self.retrieved)))
        if self.request.include_usage:
            out.append(sse({**chunk(self.cid, self.model, self.created, {}), "choices": [],
                            "usage": usage(result)}))
        return [*out, sse("[DONE]")]

    def failure(self, err: ApiError) -> list[str]:
        return [sse(err.body())]


def _jsonable(metadata: Any) -> dict[str, Any]:
    return {str(k): v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
            for k, v in dict(metadata).items()}
