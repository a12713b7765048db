"""``dgemma serve``: the official openai client against a real server process (routes, streams, drafts, the
reasoning split, stop strings, 400s, continuous batching, disconnects, 429). In-process routes, limits,
errors and units: tests/test_server_app.py."""

from __future__ import annotations

import asyncio
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

import dgemma  # noqa: E402
from dgemma.server.app import create_app  # noqa: E402

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
    # dgemma's attempt options ride along as body fields: two attempts per pass, as the engine runs them
    racing = {**FAST, "restarts": 3, "parallel_attempts": 2}
    out = client.completions.create(model=ckpt.name, prompt="The printing press", max_tokens=40, seed=7,
                                    extra_body=racing)
    assert out.choices[0].text == engine.generate("The printing press", max_new_tokens=40, seed=7, **racing).text


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
