"""The server's OpenAPI schema fuzzed by schemathesis (valid and invalid bodies): no request gets a 5xx.

A tiny model with small limits (at most 32 tokens, 4 denoising steps, 2 choices) keeps each accepted
request to a few decoder passes; 30 examples per mode and operation keep the file well under a minute.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

import dgemma  # noqa: E402
from dgemma.server.app import create_app  # noqa: E402
from dgemma.server.protocol import Limits  # noqa: E402

LIMITS = Limits(max_tokens=32, max_n=2, max_prompt_tokens=256, max_denoising_steps=4, max_restarts=1,
                max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def api_schema(ckpt_factory):
    engine = dgemma.load(ckpt_factory("tiny"))
    app = create_app(engine, model_id="tiny", max_num_seqs=4, max_queue=64, limits=LIMITS,
                     defaults=engine.params(max_new_tokens=16, max_denoising_steps=2))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=30)
    yield schema
    app.state.server.worker.stop()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code} " \
                                       f"{response.text[:300]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
