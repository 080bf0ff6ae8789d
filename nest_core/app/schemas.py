"""The request bodies of ``nest serve`` as typed pydantic models, for ``/openapi.json``.

The routes read their bodies with the wire-format parsers (:mod:`~nest_core.app.openai_api`
and its siblings), whose refusals are OpenAI-shaped errors that say what to send instead;
these models describe the same rules (the fields Nest reads, their types and bounds, the
``truncation`` extension) so a client generator or a reader of the schema sees them. Fields
the parsers ignore are allowed (``extra="allow"``), as the parsers allow them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

Truncation = Literal["auto", "disabled"]
TRUNCATION = ("`auto`: a prompt past the model's context window loses its oldest messages "
              "(then its head); `disabled` (default): such a prompt gets 400 with its token "
              "count")
Stop = str | list[str]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Body):
    type: Literal["text", "input_text", "output_text"] = "text"
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    """``POST /v1/chat/completions``: greedy, one choice, text only."""

    model: str = Field(description="A served model id (GET /v1/models) or `nest`")
    messages: list[ChatMessage] = Field(min_length=1, description="With a user message")
    max_tokens: int | None = Field(None, ge=1, description="At most the server's limit")
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens")
    stop: Stop | None = Field(None, description="Up to 4 non-empty strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Literal[0] | None = Field(None, description="Nest decodes greedily")
    n: Literal[1] | None = None
    truncation: Truncation | None = Field(None, description=f"Extension: {TRUNCATION}")


class CompletionRequest(_Body):
    """``POST /v1/completions`` (legacy): one prompt, read as one user message."""

    model: str
    prompt: str | list[str] = Field(description="One non-empty string (or a list of one)")
    max_tokens: int | None = Field(None, ge=1)
    stop: Stop | None = Field(None, description="Up to 4 non-empty strings")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Literal[0] | None = None
    n: Literal[1] | None = None
    best_of: Literal[1] | None = None
    truncation: Truncation | None = Field(None, description=f"Extension: {TRUNCATION}")


class InputMessage(_Body):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class TextFormat(_Body):
    type: Literal["text"] = "text"


class TextConfig(_Body):
    format: TextFormat | None = None


class ResponseRequest(_Body):
    """``POST /v1/responses`` (the Responses API), stateless: no stored responses, no
    tools."""

    model: str
    input: str | list[InputMessage] = Field(description="A question, or message items")
    instructions: str | None = Field(None, description="The system message")
    max_output_tokens: int | None = Field(None, ge=1, description="At most the server's limit")
    stream: bool = False
    temperature: Literal[0] | None = None
    truncation: Truncation | None = Field(None, description=TRUNCATION)
    text: TextConfig | None = None
    store: bool | None = Field(None, description="Accepted; Nest stores nothing")


REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponseRequest,
}
_REF = "#/components/schemas/{model}"


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra``: its JSON body is ``model`` (see :func:`components`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def components() -> dict[str, Any]:
    """Every model's JSON schema, for ``components.schemas`` of the OpenAPI document."""
    _, top = models_json_schema([(m, "validation") for m in REQUEST_BODIES.values()],
                                ref_template=_REF)
    return dict(top["$defs"])
