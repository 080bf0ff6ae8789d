"""``nest mcp``: Nest as an MCP server (stdio) that agents call for cited answers.

Two tools over one store and one loaded model:

- ``ask(question, max_tokens=128)``: the answer, its text with ``[n]`` marks and a numbered
  source list (what an agent's model reads), and the structured citations (kind, answer and
  source character offsets, passage id, title, source) for the application.
- ``search(query, k=5)``: the passages the store returns, best first, with their text.

The tool schemas state their bounds (``question`` non-blank, ``1 <= max_tokens <= 512``,
``1 <= k <= 50``), so an agent sees them before calling. A bad argument, or a question past
the model's context window, reaches the agent as a ``ToolError`` that says why (the SDK's
``is_error`` result with the reason as text), not as a crash: only an unexpected failure
reads "Error executing tool ask" (its traceback goes to stderr).

stdout is the protocol channel: nothing else may print there (progress and logs go to stderr).
Works with the MCP Python SDK 2.x (``MCPServer``) and 1.x (``FastMCP``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from nest_core.app.openai_api import ApiError, ChatRequest, extension, fit_window
from nest_core.app.service import AnswerService

MAX_TOKENS = 512
MAX_K = 50
MAX_QUESTION_CHARS = 20_000
NON_BLANK = r"\S"  # JSON schema pattern: at least one character that is not a space

Question = Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=NON_BLANK,
                                description="One standalone question about the documents")]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS,
                                 description="The longest answer, in tokens")]
Query = Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=NON_BLANK,
                             description="What to look for in the documents")]
K = Annotated[int, Field(ge=1, le=MAX_K, description="How many passages, best first")]
INSTRUCTIONS = (
    "Answers questions from the user's documents. Call `ask` with one standalone question: "
    "the reply quotes the documents and numbers its sources, and every citation gives the "
    "passage and character offsets. Call `search` to see which passages the store holds on "
    "a topic.")


def build_server(service: AnswerService) -> Any:
    """The MCP server object (``run("stdio")`` serves it)."""
    try:
        from mcp.server.mcpserver import MCPServer as Server
    except ImportError:  # the 1.x SDK
        from mcp.server.fastmcp import FastMCP as Server  # type: ignore[no-redef,attr-defined]

    server = Server(name="nest", instructions=INSTRUCTIONS)

    @server.tool(name="ask", description="Answer a question from the documents, with "
                                         "numbered citations of the passages it quotes.")
    async def ask(question: Question, max_tokens: MaxTokens = 128) -> dict[str, Any]:
        return await _as_tool(answer, service, question, max_tokens)

    @server.tool(name="search", description="The passages the document store returns for a "
                                            "query, best first.")
    async def search(query: Query, k: K = 5) -> dict[str, Any]:
        return await _as_tool(passages, service, query, k)

    return server


async def _as_tool(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a tool body in a worker thread; a refusal (bad argument, prompt too long, store
    timeout) becomes the SDK's ``ToolError`` with the reason, which the agent reads."""
    import anyio

    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except ApiError as err:
        raise _tool_error()(err.message) from err
    except (ValueError, TimeoutError) as err:
        raise _tool_error()(str(err)) from err


def _tool_error() -> type[Exception]:
    try:
        from mcp.server.mcpserver.exceptions import ToolError
    except ImportError:  # the 1.x SDK
        from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[no-redef,import-not-found]
    return ToolError


def answer(service: AnswerService, question: str, max_tokens: int = 128) -> dict[str, Any]:
    """The ``ask`` tool's result (a plain function: tests and other transports call it)."""
    if not isinstance(question, str) or not question.strip():
        msg = "`question` must be a non-empty string"
        raise ValueError(msg)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) \
            or not 1 <= max_tokens <= MAX_TOKENS:
        msg = f"max_tokens={max_tokens!r} must be an integer from 1 to {MAX_TOKENS}"
        raise ValueError(msg)
    request = fit_window(service.lm, ChatRequest(
        messages=[{"role": "user", "content": question}], max_tokens=max_tokens, stop=[],
        stream=False, include_usage=False))
    retrieved, result = service.answer(request)
    from nest_core.app.render import render_markdown

    nest = extension(result, retrieved)
    return {"answer": result.text, "cited_answer": render_markdown(result),
            "abstained": result.abstained, "citations": nest["citations"],
            "sources": nest["sources"]}


def passages(service: AnswerService, query: str, k: int = 5) -> dict[str, Any]:
    """The ``search`` tool's result."""
    if not isinstance(query, str) or not query.strip():
        msg = "`query` must be a non-empty string"
        raise ValueError(msg)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        msg = f"k={k!r} must be an integer from 1 to {MAX_K}"
        raise ValueError(msg)
    found = service.retrieve(query, k)
    return {"passages": [{"rank": i + 1, "id": p.id, "title": p.title, "text": p.text,
                          "source": p.metadata.get("source"), "score": p.score}
                         for i, p in enumerate(found)]}


def run(service: AnswerService) -> None:
    build_server(service).run("stdio")
