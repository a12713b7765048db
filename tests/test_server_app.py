"""``dgemma serve`` in-process: routes, limits and errors (OpenAI error bodies), the core thread's failure
handling, n choices, tool calls, prefix-cache usage, and units of the collector and the streamed text."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402

import dgemma  # noqa: E402
from dgemma.server.app import create_app  # noqa: E402
from dgemma.server.output import ChoiceText  # noqa: E402
from dgemma.server.protocol import Limits  # noqa: E402
from dgemma.server.worker import Collector  # noqa: E402
from test_server import FAST, USER, _metric, _pinned  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(ckpt_factory):
    return ckpt_factory("tiny")


@pytest.fixture(scope="module")
def engine(ckpt):
    return dgemma.load(ckpt)


@pytest.fixture(scope="module")
def app_client(ckpt):
    engine = dgemma.load(ckpt)
    app = create_app(engine, model_id="tiny", max_num_seqs=4, defaults=engine.params(max_new_tokens=32, **FAST),
                     limits=Limits(max_tokens=512, max_n=4, max_body_bytes=64 * 1024))
    with TestClient(app) as client:
        yield client


# ------------------------------------------------------------------ routes, limits and errors in-process
def test_routes_and_limits(app_client):
    c = app_client
    assert c.get("/health").json() == {"status": "ok"}
    assert c.get("/v1/models/tiny").json()["id"] == "tiny"
    assert c.get("/v1/models/other").status_code == 404
    page = c.get("/")
    assert page.status_code == 200 and "html" in page.headers["content-type"]
    assert "dgemma_requests_total" in c.get("/metrics").text
    big = c.post("/v1/completions", content=b'{"prompt": "' + b"x" * 70_000 + b'"}',
                 headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "max_tokens": "3"}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": USER, "max_tokens": 10_000}, "max_tokens"),
    ({"messages": USER, "n": 9}, "n"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "seed": 2**70}, "seed"),
    ({"messages": USER, "entropy_bound": -1}, "entropy_bound"),
    ({"messages": USER, "restart_after": 0}, "restart_after"),
    ({"messages": USER, "restart_after": 1.5}, "restart_after"),
    ({"messages": USER, "parallel_attempts": 0}, "parallel_attempts"),
    ({"messages": USER, "parallel_attempts": 65}, "parallel_attempts"),
    ({"messages": USER, "parallel_attempts": 5}, "parallel_attempts"),  # above the server's limit of 4
    ({"messages": USER, "pinned_canvas": [1, 2]}, "pinned_canvas"),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, None),
])
def test_malformed_chat_requests(app_client, body, param):
    r = app_client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize("raw", [b"{bad json", b"[]", b"null", b'"text"', b"", b'{"prompt": [1, -5]}',
                                 b'{"prompt": []}', b'{"prompt": [[]]}'])
def test_malformed_bodies(app_client, raw):
    r = app_client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "message" in r.json()["error"], r.text


def test_api_key_and_wrong_method(engine):
    app = create_app(engine, api_key="k", core=_StubCore())
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/health").status_code == 200
        r = c.get("/v1/chat/completions", headers={"Authorization": "Bearer k"})
        assert r.status_code == 405 and r.json()["error"]["message"]


def test_a_failing_step_fails_only_its_requests(app_client, monkeypatch):
    core = app_client.app.state.server.core
    real = core.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real()

    monkeypatch.setattr(core, "step", flaky)
    r = app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 32})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert app_client.post("/v1/completions", json={"prompt": "x", "max_tokens": 32}).status_code == 200
    assert "dgemma_requests_total{status=\"error\"} 1.0" in app_client.get("/metrics").text
    assert app_client.app.state.server.worker.running() == 0


def test_n_choices_use_consecutive_seeds(app_client):
    many = app_client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 32, "n": 3, "seed": 10}).json()
    one = app_client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 32, "seed": 12}).json()
    assert many["choices"][2]["text"] == one["choices"][0]["text"]
    assert many["usage"]["completion_tokens"] >= one["usage"]["completion_tokens"]


def test_tool_calls_and_max_completion_tokens(app_client, monkeypatch):
    """A Gemma tool call in the answer becomes an OpenAI ``tool_calls`` entry (finish_reason "tool_calls"), whole
    and streamed. The tiny tokenizer has no tool-call tokens, so a pinned ``Q`` decodes as a whole call."""
    engine = app_client.app.state.server.engine
    real = engine.decode
    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    monkeypatch.setattr(engine, "decode", lambda ids, skip_special_tokens=True:
                        real(ids, skip_special_tokens=skip_special_tokens).replace("Q", call))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"messages": USER, "tools": tools, "max_tokens": 32, "user": "alice",
            "pinned_canvas": _pinned(engine, "Q")}
    out = app_client.post("/v1/chat/completions", json=body).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (tc,) = choice["message"]["tool_calls"]
    assert tc["type"] == "function" and re.fullmatch(r"call_[0-9a-f]+", tc["id"])
    assert tc["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    chunks = [json.loads(line[6:]) for line in app_client.post(
        "/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
        if line.startswith("data: {")]
    calls = [t for c in chunks for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [t["function"]["name"] for t in calls] == ["get_weather"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # tool_choice "none": the text stays content
    plain = app_client.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).json()["choices"][0]
    assert plain["message"]["content"] == call and plain["finish_reason"] == "stop"
    short = app_client.post("/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 5,
                                                          "max_tokens": 100, "ignore_eos": True}).json()
    assert short["usage"]["completion_tokens"] == 5 and short["choices"][0]["finish_reason"] == "length"


def test_usage_counts_prefix_cache_hits(app_client):
    body = {"prompt": "a prompt long enough to be worth caching " * 4, "max_tokens": 16, "seed": 1}
    first = app_client.post("/v1/completions", json=body).json()["usage"]
    second = app_client.post("/v1/completions", json=body).json()["usage"]
    hits = first["prompt_tokens_details"]["cached_tokens"], second["prompt_tokens_details"]["cached_tokens"]
    assert hits[0] < 10 < hits[1] <= second["prompt_tokens"]  # (the first shares a few tokens with earlier prompts)
    assert _metric(app_client.get("/metrics").text, "dgemma_prefix_cache_hit_tokens_total") > 0


# ------------------------------------------------------------------ units: collector and streamed text
def test_collector_merges_for_a_slow_consumer():
    from dgemma.core import CanvasEvent, StepEvent

    async def go():
        c = Collector()
        c.put(0, "step", StepEvent(1, 0, 1, [5], 1, 0.5))
        c.put(0, "step", StepEvent(1, 0, 2, [6], 1, 0.4))
        c.put(0, "canvas", CanvasEvent(1, 0, [1, 2], False))
        c.put(0, "canvas", CanvasEvent(1, 1, [3], True), "result")
        c.put(1, "error", "bad", 400)
        got = await c.get()
        assert got[0].tokens == [1, 2, 3] and got[0].canvases == 2 and got[0].draft.step == 2
        assert got[0].finished and got[0].result == "result"
        assert got[1].error == "bad" and got[1].status == 400

    asyncio.run(go())


MARKERS = ("<|channel>", "<channel|>")


def _tokens(text: str) -> list[str]:
    """Characters, with the Gemma channel markers as single (special) tokens, as a real tokenizer has them."""
    return [t for t in re.split(r"(<\|channel>|<channel\|>)|", text) if t]


def _decoder(vocab: list[str]):
    return lambda ids, skip_special: "".join(vocab[i] for i in ids if not (skip_special and vocab[i] in MARKERS))


@pytest.mark.parametrize("text, stops, tools", [
    ("<|channel>thought\nLet me think.<channel|>  The answer is 42. STOP and more", ["STOP"], False),
    ("  plain answer with trailing space  ", [], False),
    ("<|channel>thoughtful<channel|>x", [], False),
    ("Calling <|tool_call>call:get{city:<|\"|>Paris<|\"|>}<tool_call|> done", [], True),
    ("ab, cd, ef", [", e", "zzz"], False),
])
def test_streamed_deltas_add_up_to_the_answer(text, stops, tools):
    vocab = _tokens(text)
    ids, decode = list(range(len(vocab))), _decoder(vocab)
    for chat in (True, False):
        whole = ChoiceText(decode, chat, stops, tools)
        whole.tokens = ids
        reasoning, content, calls = whole.result()
        for size in (1, 3, 7):
            stream = ChoiceText(decode, chat, stops, tools)
            parts = {"reasoning_content": "", "content": "", "tool_calls": []}
            for i in range(0, len(ids), size):
                for k, v in stream.feed(ids[i:i + size]).items():
                    parts[k] += v
                if stream.stopped:
                    break
            for k, v in stream.finish().items():
                parts[k] += v
            assert parts["content"] == content and parts["reasoning_content"] == (reasoning or "")
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in parts["tool_calls"]] == \
                [(c["name"], c["arguments"]) for c in calls]
    if tools:
        assert calls == [{"name": "get", "arguments": json.dumps({"city": "Paris"})}] and content == "Calling  done"


class _StubCore:
    """The least of an EngineCore for tests that never generate."""

    max_num_seqs = num_slots = 1
    num_waiting = num_running = 0
    max_model_len = 4096

    def has_work(self):
        return False

    def check(self, ids, params):
        pass

    def running_ids(self):
        return []


def test_serve_cli_is_registered():
    from dgemma.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "0", "--max-num-seqs", "2", "--api-key", "k"])
    assert args.host == "127.0.0.1" and args.max_num_seqs == 2 and args.api_key == "k" and args.threads is None
    assert args.max_queue is None and args.kv_cache_gb is None and args.model is None
