"""The server's routes beyond plain chat, in-process (the real ASGI app under FastAPI's
TestClient, the tiny random Llama, a real in-memory store), called by the real ``openai``
client and LangChain's ``ChatOpenAI`` through the TestClient: streamed chat annotations,
the Responses API (plain and streamed), legacy text completions, the context-window rule
and absolute citation URLs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from nest_core.app.openai_api import url_of
from nest_core.app.serve import ServeLimits, create_app
from nest_core.app.service import AnswerService
from nest_core.config import paper_config
from nest_core.stores.embeddings import HashingEmbeddings
from nest_core.stores.sources.memory import InMemorySource
from nest_core.types import Passage
from tests.conftest import TINY_CORPUS

QUESTION = "Who founded the Zephyr Widget Company?"
PASSAGES = [Passage(id=f"p{i}", text=t, title=f"T{i}", metadata={"source": f"doc{i}.txt"})
            for i, t in enumerate(TINY_CORPUS)]
MAX = 16


@pytest.fixture(scope="module")
def service(tiny_lm: Any) -> AnswerService:
    # the paper's settings: the random model's answer has citations (see test_serve.py)
    return AnswerService(InMemorySource(PASSAGES, embed=HashingEmbeddings(64)), tiny_lm, k=3,
                         config=paper_config(tiny_lm.name))


@pytest.fixture(scope="module")
def http(service: AnswerService) -> TestClient:
    return TestClient(create_app(service, ServeLimits(max_tokens=64)))


@pytest.fixture(scope="module")
def client(http: TestClient) -> Any:
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http,
                  max_retries=0)


@pytest.fixture(scope="module")
def chat(client: Any) -> Any:
    """The plain chat completion every other route is held to."""
    return client.chat.completions.create(
        model="nest", messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX)


def annotation_dicts(message: Any) -> list[dict[str, Any]]:
    return [a.model_dump() for a in message.annotations]


def flat(annotations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat's ``{"type", "url_citation": {...}}`` as the Responses API's flat objects."""
    return [{"type": "url_citation", **a["url_citation"]} for a in annotations]


# --- streamed chat: the annotations -------------------------------------------------------------
def test_chat_stream_sends_the_annotations_before_finishing(client: Any, chat: Any) -> None:
    message = chat.choices[0].message
    assert message.annotations, "the tiny model's answer has citations"
    chunks = list(client.chat.completions.create(
        model="nest", messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX,
        stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == message.content
    (at,) = [i for i, c in enumerate(chunks) if "annotations" in (c.choices[0].delta.model_extra
                                                                  or {})]
    streamed = chunks[at].choices[0].delta.model_extra["annotations"]
    assert streamed == annotation_dicts(message)
    assert chunks[at].choices[0].delta.content is None  # after the text ...
    assert all(not c.choices[0].delta.content for c in chunks[at:])
    assert chunks[at].choices[0].finish_reason is None  # ... before the finish
    assert chunks[at + 1].choices[0].finish_reason == chat.choices[0].finish_reason
    citations = chunks[at + 1].model_extra["nest"]["citations"]
    assert [text[a["url_citation"]["start_index"]:a["url_citation"]["end_index"]]
            for a in streamed] == [c["text"] for c in citations]


# --- the Responses API ----------------------------------------------------------------------------
def test_responses_answer_with_url_citations(client: Any, chat: Any) -> None:
    response = client.responses.create(model="nest", input=QUESTION, max_output_tokens=MAX)
    message = chat.choices[0].message
    assert response.output_text == message.content
    (item,) = response.output
    (part,) = item.content
    assert (item.type, item.role, part.type) == ("message", "assistant", "output_text")
    assert [a.model_dump() for a in part.annotations] == flat(annotation_dicts(message))
    for a in part.annotations:
        assert a.url.startswith("file:///")
        assert a.title
    assert response.model_extra["nest"]["citations"] == chat.model_extra["nest"]["citations"]
    cut = chat.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if cut else "completed")
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_stream_follows_openais_events(client: Any) -> None:
    plain = client.responses.create(model="nest", input=QUESTION, max_output_tokens=MAX)
    with client.responses.create(model="nest", input=QUESTION, max_output_tokens=MAX,
                                 stream=True) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    final = "response.incomplete" if plain.status == "incomplete" else "response.completed"
    deltas = kinds.count("response.output_text.delta")
    notes = kinds.count("response.output_text.annotation.added")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     *["response.output_text.annotation.added"] * notes,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", final]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text == events[-1].response.output_text
    added = [e for e in events if e.type == "response.output_text.annotation.added"]
    assert [e.annotation_index for e in added] == list(range(notes))
    expected = [a.model_dump() for a in plain.output[0].content[0].annotations]
    assert [e.annotation.model_dump() for e in added] == expected
    assert [a.model_dump() for a in events[-1].response.output[0].content[0].annotations] \
        == expected
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {events[-1].response.output[0].id}


def test_chat_openai_on_the_responses_api_gets_annotated_blocks(http: TestClient,
                                                               client: Any) -> None:
    from langchain_openai import ChatOpenAI

    plain = client.responses.create(model="nest", input=QUESTION, max_output_tokens=MAX)
    expected = [a.model_dump() for a in plain.output[0].content[0].annotations]
    model = ChatOpenAI(base_url="http://testserver/v1", api_key="unused", model="nest",
                       use_responses_api=True, max_tokens=MAX, http_client=http,
                       max_retries=0)
    message = model.invoke(QUESTION)
    (block,) = message.content
    assert (block["text"], block["annotations"]) == (plain.output_text, expected)
    merged = None
    for piece in model.stream(QUESTION):
        merged = piece if merged is None else merged + piece
    assert merged is not None
    (block,) = merged.content
    assert (block["text"], block["annotations"]) == (plain.output_text, expected)


def test_responses_reads_instructions_and_message_items(client: Any, chat: Any) -> None:
    items = [{"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": QUESTION}]}]
    response = client.responses.create(model="nest", input=items, max_output_tokens=MAX)
    assert response.output_text == chat.choices[0].message.content
    instructed = client.responses.create(model="nest", input=QUESTION, instructions="Be brief.",
                                         max_output_tokens=MAX)
    same = client.chat.completions.create(model="nest", max_tokens=MAX, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}])
    assert instructed.output_text == same.choices[0].message.content


def respond(**overrides: Any) -> dict[str, Any]:
    return {"model": "nest", "input": QUESTION, "max_output_tokens": MAX, **overrides}


@pytest.mark.parametrize(("body", "status", "match"), [
    (respond(model="gpt-4o"), 404, "not served"),
    (respond(input=[]), 400, "`input` must be"),
    (respond(input=[{"type": "function_call_output", "output": "1"}]), 400, "message items"),
    (respond(input=[{"role": "user", "content": [{"type": "input_image",
                                                  "image_url": "x"}]}]), 400, "text parts"),
    (respond(previous_response_id="resp_1"), 400, "stores no responses"),
    (respond(tools=[{"type": "web_search"}]), 400, "nest mcp"),
    (respond(text={"format": {"type": "json_object"}}), 400, "text.format"),
    (respond(temperature=0.5), 400, "greedily"),
    (respond(max_output_tokens=65), 400, "max_output_tokens=65 must be"),
    (respond(truncation="sometimes"), 400, "truncation"),
    (respond(stream="yes"), 400, "true or false"),
])
def test_responses_refusals_are_openai_errors(http: TestClient, body: Any, status: int,
                                             match: str) -> None:
    r = http.post("/v1/responses", json=body)
    assert r.status_code == status
    assert match in r.json()["error"]["message"]
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# --- legacy text completions ----------------------------------------------------------------------
def test_completions_plain_and_streamed(client: Any, chat: Any) -> None:
    plain = client.completions.create(model="nest", prompt=QUESTION, max_tokens=MAX)
    (choice,) = plain.choices
    assert plain.object == "text_completion"
    assert choice.text == chat.choices[0].message.content
    assert choice.finish_reason == chat.choices[0].finish_reason
    assert plain.model_extra["nest"]["citations"] == chat.model_extra["nest"]["citations"]
    assert plain.usage.completion_tokens == chat.usage.completion_tokens
    chunks = list(client.completions.create(model="nest", prompt=QUESTION, max_tokens=MAX,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    (last,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.model_extra["nest"]["citations"] == plain.model_extra["nest"]["citations"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_honour_stop(client: Any, chat: Any) -> None:
    text = chat.choices[0].message.content
    word = text.split()[1]
    cut = client.completions.create(model="nest", prompt=QUESTION, max_tokens=MAX, stop=[word])
    assert cut.choices[0].text == text[:text.index(word)]


@pytest.mark.parametrize(("overrides", "match"), [
    ({"prompt": ["one", "two"]}, "one non-empty string"),
    ({"prompt": ""}, "one non-empty string"),
    ({"echo": True}, "prepend the prompt"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 2}, "best_of must be 1"),
    ({"logprobs": 2}, "log probabilities"),
    ({"max_tokens": 0}, "from 1 to 64"),
])
def test_completions_refusals(http: TestClient, overrides: dict[str, Any], match: str) -> None:
    r = http.post("/v1/completions", json={"model": "nest", "prompt": QUESTION, **overrides})
    assert r.status_code == 400
    assert match in r.json()["error"]["message"]


# --- the context window -----------------------------------------------------------------------
LONG = "compiler interpreter widget " * 100  # far past the tiny model's 256 tokens


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}),
    ("/v1/completions", {"prompt": LONG}),
    ("/v1/responses", {"input": LONG}),
])
def test_a_prompt_past_the_window_is_refused_with_its_size(http: TestClient, tiny_lm: Any,
                                                           route: str, body: Any) -> None:
    tokens = "max_output_tokens" if route == "/v1/responses" else "max_tokens"
    r = http.post(route, json={"model": "nest", tokens: MAX, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    count = len(tiny_lm.prompt_ids([{"role": "user", "content": LONG}]))
    assert count > tiny_lm.max_context
    assert f"the prompt is {count} tokens" in error["message"]
    assert f"context window is {tiny_lm.max_context} tokens" in error["message"]
    assert f"at most {tiny_lm.max_context - MAX} prompt tokens" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_truncation_auto_drops_the_oldest_messages(client: Any, chat: Any) -> None:
    history = [{"role": "user", "content": LONG}, {"role": "assistant", "content": LONG},
               {"role": "user", "content": QUESTION}]
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="context window"):
        client.chat.completions.create(model="nest", messages=history, max_tokens=MAX)
    fitted = client.chat.completions.create(model="nest", messages=history, max_tokens=MAX,
                                            extra_body={"truncation": "auto"})
    assert fitted.choices[0].message.content == chat.choices[0].message.content
    assert fitted.model_extra["nest"]["prompt_truncated"] is False
    response = client.responses.create(model="nest", input=history, max_output_tokens=MAX,
                                       truncation="auto")
    assert response.output_text == chat.choices[0].message.content


def test_truncation_auto_cuts_the_head_of_one_long_message(http: TestClient) -> None:
    r = http.post("/v1/completions", json={"model": "nest", "prompt": LONG + QUESTION,
                                           "max_tokens": MAX, "truncation": "auto"})
    assert r.status_code == 200
    assert r.json()["nest"]["prompt_truncated"] is True


# --- citation URLs --------------------------------------------------------------------------------
@pytest.mark.parametrize(("metadata", "url"), [
    ({"source": "https://example.org/a?b=1"}, "https://example.org/a?b=1"),
    ({"source": "/srv/docs/a b.md"}, "file:///srv/docs/a%20b.md"),
    ({"source": "docs/a.md"}, (Path.cwd() / "docs/a.md").as_uri()),
    ({"file_path": "/srv/docs/a.md"}, "file:///srv/docs/a.md"),
    ({}, "nest:passage/p9"),
])
def test_citation_urls_are_absolute(metadata: dict[str, str], url: str) -> None:
    assert url_of(Passage(id="p9", text="x", metadata=metadata)) == url


def test_sse_events_are_named_on_the_responses_route(http: TestClient) -> None:
    with http.stream("POST", "/v1/responses", json=respond(stream=True)) as r:
        r.read()
    lines = r.text.splitlines()
    named = [line[len("event: "):] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]
    assert named == [d["type"] for d in data]
