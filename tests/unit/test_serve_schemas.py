"""The request schemas of ``/openapi.json`` (:mod:`nest_core.app.schemas`) and the parsers the
routes use agree: the document names a body model per route, and a body the parser accepts
validates against the route's model, one it refuses for a reason a schema can state does
not. (The routes themselves are tested in test_serve.py and test_serve_routes.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError

from nest_core.app import completions_api, openai_api, responses_api
from nest_core.app.schemas import REQUEST_BODIES
from nest_core.app.serve import create_app
from nest_core.app.service import AnswerService
from nest_core.stores.embeddings import HashingEmbeddings
from nest_core.stores.sources.memory import InMemorySource

LIMITS = {"model_ids": ("nest",), "max_tokens_limit": 64, "default_max_tokens": 16}
HI = [{"role": "user", "content": "hi"}]


def test_openapi_documents_a_request_body_per_route(tiny_lm: Any) -> None:
    service = AnswerService(InMemorySource([], embed=HashingEmbeddings(8)), tiny_lm, k=1)
    document = TestClient(create_app(service)).get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, model in REQUEST_BODIES.items():
        body = document["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model.__name__}"
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
    truncation = schemas["ChatCompletionRequest"]["properties"]["truncation"]
    assert {"enum": ["auto", "disabled"], "type": "string"} in truncation["anyOf"]
    assert schemas["ResponseRequest"]["required"] == ["model", "input"]


def parse(path: str, body: dict[str, Any]) -> None:
    if path == "/v1/chat/completions":
        openai_api.parse_request(body, **LIMITS, max_messages=8)
    elif path == "/v1/responses":
        responses_api.parse_request(body, **LIMITS, max_messages=8)
    else:
        completions_api.parse_request(body, **LIMITS)


def valid(model: type[BaseModel], body: dict[str, Any]) -> bool:
    try:
        model.model_validate_json(json.dumps(body), strict=True)
    except ValidationError:
        return False
    return True


CHAT, RESP, LEGACY = "/v1/chat/completions", "/v1/responses", "/v1/completions"


@pytest.mark.parametrize(("path", "body", "accepted"), [
    (CHAT, {"model": "nest", "messages": HI}, True),
    (CHAT, {"model": "nest", "messages": [{"role": "developer", "content": "brief"},
                                          {"role": "user", "content": [
                                              {"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 8, "stop": ["\n"], "temperature": 0, "n": 1,
            "stream": True, "stream_options": {"include_usage": True},
            "truncation": "auto", "user": "ignored"}, True),
    (CHAT, {"model": "nest", "messages": []}, False),
    (CHAT, {"model": "nest", "messages": [{"role": "wizard", "content": "hi"}]}, False),
    (CHAT, {"model": "nest", "messages": [{"role": "user", "content": 3}]}, False),
    (CHAT, {"model": "nest", "messages": HI, "max_tokens": "8"}, False),
    (CHAT, {"model": "nest", "messages": HI, "max_tokens": 0}, False),
    (CHAT, {"model": "nest", "messages": HI, "temperature": 0.7}, False),
    (CHAT, {"model": "nest", "messages": HI, "n": 2}, False),
    (CHAT, {"model": "nest", "messages": HI, "stream": "yes"}, False),
    (CHAT, {"model": "nest", "messages": HI, "truncation": "sometimes"}, False),
    (RESP, {"model": "nest", "input": "hi"}, True),
    (RESP, {"model": "nest", "input": [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "hi"}]}], "instructions": "brief",
        "max_output_tokens": 8, "truncation": "auto", "store": False,
        "text": {"format": {"type": "text"}}}, True),
    (RESP, {"model": "nest", "input": [{"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "x"}]}]}, False),
    (RESP, {"model": "nest", "input": "hi", "text": {"format": {"type": "json_object"}}},
     False),
    (RESP, {"model": "nest", "input": "hi", "max_output_tokens": 0}, False),
    (LEGACY, {"model": "nest", "prompt": "hi"}, True),
    (LEGACY, {"model": "nest", "prompt": ["hi"], "max_tokens": 8, "stop": "\n",
              "best_of": 1, "truncation": "disabled"}, True),
    (LEGACY, {"model": "nest", "prompt": 3}, False),
    (LEGACY, {"model": "nest", "prompt": "hi", "best_of": 2}, False),
])
def test_the_schema_and_the_parser_agree(path: str, body: dict[str, Any],
                                         accepted: bool) -> None:
    try:
        parse(path, body)
        parsed = True
    except openai_api.ApiError:
        parsed = False
    assert parsed is accepted
    assert valid(REQUEST_BODIES[path], body) is accepted
