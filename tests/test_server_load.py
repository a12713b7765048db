"""Load on loopback, bounded: 64 concurrent streaming clients against a real ``dgemma serve`` (tiny model).

Every request must end with its answer or an explicit 429 (16 generate at once, 32 may wait, the rest
are refused), none may hang, and the server's resident memory must come back to within 10% of what it
was after a warm-up request.
"""

from __future__ import annotations

import asyncio
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_server import KEY, LONG, ServerProcess, _metric  # noqa: E402

CLIENTS = 64
DEADLINE_S = 240  # far above what the load takes (about 20 s on one thread): a hang, not slowness


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(ckpt_factory, tmp_path_factory):
    ckpt = ckpt_factory("tiny")
    s = ServerProcess(ckpt, tmp_path_factory.mktemp("load") / "log.txt", "--api-key", KEY,
                      "--max-num-seqs", "16", "--max-queue", "32")
    s.model = ckpt.name
    yield s
    s.stop()


def _idle(server, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        if _metric(text, "dgemma_running_requests") == 0 and _metric(text, "dgemma_queue_depth") == 0:
            return text
        assert time.monotonic() < deadline, "the server did not drain"
        time.sleep(0.2)


def test_64_concurrent_streams_end_with_an_answer_or_429(server):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=DEADLINE_S)

    async def one(i: int) -> str:
        try:
            stream = await client.completions.create(model=server.model, prompt=f"load {i}", max_tokens=32, seed=i,
                                                     stream=True, extra_body=LONG)
            finish, text = None, ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text or ""
                    finish = chunk.choices[0].finish_reason or finish
            return "ok" if finish in ("stop", "length") and text else f"bad: {finish!r} {text!r}"
        except openai.RateLimitError:
            return "429"

    async def crowd() -> tuple[int, list[str]]:
        await client.completions.create(model=server.model, prompt="warm up", max_tokens=32, extra_body=LONG)
        await asyncio.to_thread(_idle, server)
        baseline = _rss_kib(server.proc.pid)
        outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(CLIENTS))), DEADLINE_S)
        return baseline, outcomes

    baseline, outcomes = asyncio.run(crowd())
    assert all(o in ("ok", "429") for o in outcomes), [o for o in outcomes if o not in ("ok", "429")]
    assert outcomes.count("ok") >= 48  # 16 running + 32 waiting were never refused
    assert "429" in outcomes  # and the rest were, explicitly
    after = _idle(server)
    assert _metric(after, 'dgemma_requests_total', '{status="ok"}') >= outcomes.count("ok") + 1
    time.sleep(1.0)
    rss = _rss_kib(server.proc.pid)
    assert rss <= 1.10 * baseline, f"RSS {rss} KiB after the load, {baseline} KiB before"
