"""``dgemma serve``: the official openai client against a real server process, routes, limits and errors
in-process, the core thread's failure handling, and the streamed text adding up to the final answer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import dgemma  # noqa: E402
from dgemma.server.app import create_app  # noqa: E402
from dgemma.server.output import ChoiceText  # noqa: E402
from dgemma.server.protocol import Limits  # noqa: E402
from dgemma.server.worker import Collector  # noqa: E402

KEY = "sk-test"
FAST = {"max_denoising_steps": 4, "confidence_threshold": 0.0}  # four steps per canvas, no early stop
LONG = {**FAST, "ignore_eos": True}  # a random model writes EOS now and then: long requests must not stop
USER = [{"role": "user", "content": "Hi there"}]


# ------------------------------------------------------------------ fixtures
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, ckpt: Path, log: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dgemma", "serve", "--model", str(ckpt), "--port", str(self.port),
             "--threads", "1", "--max-denoising-steps", "4", "--confidence-threshold", "0", *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dgemma serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"dgemma serve did not come up: {log.read_text()[-2000:]}")

    def client(self, key: str = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def ckpt(ckpt_factory):
    return ckpt_factory("tiny")


@pytest.fixture(scope="module")
def engine(ckpt):
    return dgemma.load(ckpt)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = ServerProcess(ckpt, tmp_path_factory.mktemp("serve") / "log.txt", "--api-key", KEY, "--max-num-seqs", "32")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def app_client(ckpt):
    engine = dgemma.load(ckpt)
    app = create_app(engine, model_id="tiny", max_num_seqs=4, defaults=engine.params(max_new_tokens=32, **FAST),
                     limits=Limits(max_tokens=512, max_n=4, max_body_bytes=64 * 1024))
    with TestClient(app) as client:
        yield client


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _pinned(engine, text: str, eos: bool = True) -> list[int]:
    """The first canvas pinned to ``text`` (a token per byte, Gemma markers as their special ids), then EOS
    (``eos``) or, without it, ``x`` up to the canvas length."""
    ids: list[int] = []
    for part in re.split(r"(<\|channel>|<channel\|>)", text):
        if part:
            tid = engine.tokenizer.token_to_id(part)
            ids += [tid] if part.startswith("<") and tid is not None else engine.tokenizer.encode(part)
    c = engine.config.canvas_length
    ids += [engine.defaults.eos_token_id[0]] if eos else engine.tokenizer.encode("x" * (c - len(ids)))
    assert len(ids) <= c
    return ids + [-1] * (c - len(ids))


# ------------------------------------------------------------------ the openai client against `dgemma serve`
def test_models_chat_completions_and_usage(server, ckpt):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [ckpt.name]
    chat = client.chat.completions.create(model=ckpt.name, messages=USER, max_tokens=32, seed=1, extra_body=FAST)
    assert chat.object == "chat.completion" and len(chat.choices) == 1
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 32
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    done = client.completions.create(model=ckpt.name, prompt="Hello", max_tokens=20, seed=1, n=2, extra_body=FAST)
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens <= 40
    # the model may be left out; 401 without the key, 404 for another model
    assert client.completions.create(model="", prompt="Hello", max_tokens=16, extra_body=FAST).choices
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=USER, max_tokens=16)
    assert info.value.body["code"] == "model_not_found"
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed


def test_same_text_as_engine_generate(server, ckpt, engine):
    client = server.client()
    out = client.completions.create(model=ckpt.name, prompt="The printing press", max_tokens=40, seed=7,
                                    extra_body=FAST)
    local = engine.generate("The printing press", max_new_tokens=40, seed=7, **FAST)
    assert out.choices[0].text == local.text and out.usage.completion_tokens == len(local.token_ids)
    chat = client.chat.completions.create(model=ckpt.name, messages=USER, max_tokens=40, seed=7, extra_body=FAST)
    assert chat.choices[0].message.content == engine.chat(USER, seed=7, max_new_tokens=40, **FAST).answer
    # n choices: choice i samples with seed + i
    two = client.completions.create(model=ckpt.name, prompt="The printing press", max_tokens=40, seed=6, n=2,
                                    extra_body=FAST)
    assert two.choices[1].text == local.text


def test_streaming_with_drafts_and_usage(server, ckpt):
    client = server.client()
    stream = client.chat.completions.create(model=ckpt.name, messages=USER, max_tokens=48, seed=2, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={**FAST, "include_drafts": True})
    drafts, content, finish, usage = [], "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        draft = getattr(chunk, "draft", None)
        if draft is not None:
            assert chunk.choices[0].delta.content is None
            assert set(draft) >= {"canvas", "step", "text", "settled", "mean_entropy", "tokens", "settled_mask"}
            assert len(draft["tokens"]) == len(draft["settled_mask"]) == draft["canvas_length"]
            assert sum(draft["settled_mask"]) == draft["settled"] >= 1
            drafts.append(draft)
        elif chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert len(drafts) >= 4 and len({d["text"] for d in drafts}) >= 2
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0
    whole = client.chat.completions.create(model=ckpt.name, messages=USER, max_tokens=48, seed=2, extra_body=FAST)
    assert content == whole.choices[0].message.content
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    # without drafts: only canvas chunks; completions stream the same text as a whole completion
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=ckpt.name, prompt="Hello", max_tokens=40, seed=3, stream=True, extra_body=FAST) if c.choices)
    assert text == client.completions.create(model=ckpt.name, prompt="Hello", max_tokens=40, seed=3,
                                             extra_body=FAST).choices[0].text


def test_reasoning_split_and_stop_strings(server, ckpt, engine):
    client = server.client()
    pinned = _pinned(engine, "<|channel>thought\nhm<channel|>ok")
    kw = dict(model=ckpt.name, messages=USER, max_tokens=64, seed=0,
              extra_body={**FAST, "pinned_canvas": pinned, "chat_template_kwargs": {"enable_thinking": True}})
    reply = client.chat.completions.create(**kw)
    message = reply.choices[0].message
    assert message.reasoning_content == "hm" and message.content == "ok" and reply.choices[0].finish_reason == "stop"
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            reasoning += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
            content += chunk.choices[0].delta.content or ""
    assert (reasoning, content) == ("hm", "ok")
    # a stop string cuts the text and ends the request after that canvas (64 tokens were allowed)
    stop = dict(model=ckpt.name, prompt="Hello", max_tokens=64, seed=0, stop=["STOP"],
                extra_body={**FAST, "pinned_canvas": _pinned(engine, "ab STOP cd", eos=False)})
    out = client.completions.create(**stop)
    assert out.choices[0].text == "ab " and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == engine.config.canvas_length
    streamed = [c.choices[0] for c in client.completions.create(stream=True, **stop) if c.choices]
    assert "".join(c.text for c in streamed) == "ab " and streamed[-1].finish_reason == "stop"


def test_bad_requests_are_400s(server, ckpt):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=ckpt.name, prompt="x" * 5000, max_tokens=16)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=ckpt.name, messages=USER, max_tokens=16,
                                       extra_body={"t_max": 0.1, "t_min": 0.5})
    assert info.value.body["param"] == "t_max"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=ckpt.name, messages=USER, max_tokens=16,
                                       extra_body={"max_denoising_steps": 0})
    assert info.value.body["param"] == "max_denoising_steps"


def test_continuous_batching(server, ckpt):
    """32 concurrent streams share decoder passes, and a short request overtakes long ones."""
    before = server.metrics()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(max_tokens: int, seed: int, started: asyncio.Event | None = None) -> float:
        stream = await client.completions.create(model=ckpt.name, prompt=f"story {seed}", max_tokens=max_tokens,
                                                 seed=seed, stream=True, extra_body=LONG)
        async for _ in stream:
            if started is not None:
                started.set()
        return time.monotonic()

    async def crowd():
        await asyncio.gather(*(one(48, i) for i in range(32)))
        longs_started = [asyncio.Event() for _ in range(3)]
        longs = [asyncio.create_task(one(160, 100 + i, e)) for i, e in enumerate(longs_started)]
        await asyncio.gather(*(e.wait() for e in longs_started))
        short_done = await one(16, 200)
        return short_done, await asyncio.gather(*longs)

    short_done, long_done = asyncio.run(crowd())
    assert short_done < min(long_done)
    after = server.metrics()
    rows = _metric(after, "dgemma_batch_rows_sum") - _metric(before, "dgemma_batch_rows_sum")
    passes = _metric(after, "dgemma_batch_rows_count") - _metric(before, "dgemma_batch_rows_count")
    assert passes > 0 and rows / passes > 4
    assert _metric(after, "dgemma_generated_tokens_total") > _metric(before, "dgemma_generated_tokens_total")
    assert _metric(after, "dgemma_denoising_steps_total") >= rows


def _wait_idle(server, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.metrics()
        if _metric(text, "dgemma_running_requests") == 0 and _metric(text, "dgemma_queue_depth") == 0:
            return text
        time.sleep(0.05)
    raise AssertionError(f"requests still running: {server.metrics()}")


def test_disconnect_frees_the_slot(server, ckpt):
    _wait_idle(server)
    aborted = _metric(server.metrics(), "dgemma_requests_total", '{status="aborted"}')
    body = {"model": ckpt.name, "prompt": "go on", "max_tokens": 4000, **LONG, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()  # kept referenced: a closed line iterator would close the connection early
        while not next(lines).startswith("data:"):
            pass
        time.sleep(0.3)
        assert _metric(server.metrics(), "dgemma_running_requests") == 1
    t0 = time.monotonic()
    text = _wait_idle(server)
    assert time.monotonic() - t0 < 5  # 250 canvases would take far longer
    # a non-streaming request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, headers=headers, timeout=1.0)
    text = _wait_idle(server)
    assert _metric(text, "dgemma_requests_total", '{status="aborted"}') == aborted + 2


def test_full_queue_is_429(ckpt):
    """One slot and one waiting seat: of five concurrent requests two are served and three get 429 (the
    official client over an in-process transport, so that no second server process has to start)."""
    engine = dgemma.load(ckpt)
    app = create_app(engine, model_id="tiny", max_num_seqs=1, max_queue=1)

    async def many():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as http:
            client = openai.AsyncOpenAI(base_url="http://tiny/v1", api_key="none", max_retries=0, http_client=http)

            async def one():
                try:
                    await client.completions.create(model="tiny", prompt="x", max_tokens=160, extra_body=LONG)
                    return 200
                except openai.RateLimitError as e:
                    assert e.response.headers.get("retry-after") and e.body["code"] == "queue_full"
                    return 429

            return await asyncio.gather(*(one() for _ in range(5))), (await http.get("/metrics")).text

    try:
        codes, metrics = asyncio.run(many())
    finally:
        app.state.server.worker.stop()
    assert sorted(codes) == [200, 200, 429, 429, 429]
    assert _metric(metrics, "dgemma_requests_total", '{status="rejected"}') == 3


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
