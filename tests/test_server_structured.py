"""``response_format`` and forced tool calls through the server (in-process): every answer parses and
validates against its schema with random weights, streamed or whole; what cannot be honoured is a 400
that names the problem, before anything is queued."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
jsonschema = pytest.importorskip("jsonschema")

from fastapi.testclient import TestClient  # noqa: E402

import dgemma  # noqa: E402
from dgemma.server.app import create_app  # noqa: E402
from dgemma.server.protocol import Limits  # noqa: E402
from test_server import FAST  # noqa: E402
from test_server_tools import write_tool_checkpoint  # noqa: E402

USER = [{"role": "user", "content": "Describe a city as JSON."}]
CITY = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "population": {"type": "integer", "minimum": 0, "maximum": 5000000},
    "capital": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["old", "new", "big"]}, "maxItems": 3},
    "mayor": {"type": ["string", "null"], "maxLength": 8}},
    "required": ["name", "population", "capital"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = write_tool_checkpoint(tmp_path_factory.mktemp("ckpt_structured"))
    engine = dgemma.load(ckpt)
    app = create_app(engine, model_id="tiny", max_num_seqs=4, defaults=engine.params(max_new_tokens=32, **FAST),
                     limits=Limits(max_tokens=1024, max_n=4))
    with TestClient(app) as c:
        yield c


def _stream_text(c, path: str, body: dict) -> tuple[str, list[dict]]:
    text, chunks = "", []
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                chunks.append(chunk)
                for choice in chunk["choices"]:
                    text += choice.get("delta", {}).get("content") or choice.get("text") or ""
    return text, chunks


def test_json_schema_answers_validate_on_chat_and_completions(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    for seed in range(3):
        r = client.post("/v1/chat/completions", json={"messages": USER, "response_format": fmt, "seed": seed, "n": 2})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), CITY)
            assert choice["finish_reason"] == "stop"
        r = client.post("/v1/completions", json={"prompt": "City:", "response_format": fmt, "seed": seed})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), CITY)
    text, _ = _stream_text(client, "/v1/chat/completions", {"messages": USER, "response_format": fmt, "seed": 7})
    jsonschema.validate(json.loads(text), CITY)


def test_json_object_answers_are_objects(client):
    for seed in range(3):
        r = client.post("/v1/chat/completions", json={"messages": USER, "seed": seed,
                                                      "response_format": {"type": "json_object"}})
        assert r.status_code == 200, r.text
        assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)


def test_a_named_function_is_called_with_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        r = client.post("/v1/chat/completions", json={"messages": USER, "tools": [TIME, WEATHER], "seed": seed,
                                                      "tool_choice": choice})
        assert r.status_code == 200, r.text
        out = r.json()["choices"][0]
        assert out["finish_reason"] == "tool_calls"
        (call,) = out["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    _, chunks = _stream_text(client, "/v1/chat/completions", {"messages": USER, "tools": [WEATHER], "seed": 1,
                                                              "tool_choice": choice})
    calls = [tc for ch in chunks for c in ch["choices"] for tc in c["delta"].get("tool_calls") or []]
    assert [tc["function"]["name"] for tc in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER["function"]["parameters"])


def test_required_picks_one_of_several_tools_and_its_arguments_validate(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(2):
        r = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER, TIME], "seed": seed,
                                                      "tool_choice": "required", "n": 2})
        assert r.status_code == 200, r.text
        for out in r.json()["choices"]:
            (call,) = out["message"]["tool_calls"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    text, chunks = _stream_text(client, "/v1/chat/completions", {
        "messages": USER, "tools": [WEATHER, TIME], "seed": 0, "tool_choice": "required", "include_drafts": True})
    calls = [tc for ch in chunks for c in ch["choices"] for tc in c["delta"].get("tool_calls") or []]
    assert len(calls) == 1 and calls[0]["function"]["name"] in schemas


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"oneOf": [{"type": "string"}]}}}},
     "response_format.json_schema.schema", "oneOf"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"$ref": "#/x"}}}}}}, "response_format.json_schema.schema", "$ref"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema", "schema"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop", "stop"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": CITY}}, "max_tokens": 3}, "max_tokens",
     "needs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "email"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", "format"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(client, extra, param, words):
    r = client.post("/v1/chat/completions", json={"messages": USER, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
