"""``dgemma serve``: an OpenAI-compatible HTTP server over the engine core.

``protocol`` (request/response schemas, ``to_sampling_params``), ``output`` (one choice's text: reasoning
split, stop strings, tool calls, stream deltas), ``worker`` (the core thread and per-request collectors),
``metrics`` (Prometheus), ``app`` (``create_app(engine, ...)``: routes, limits, errors), ``tools`` (Gemma
tool-call syntax). FastAPI, uvicorn and prometheus_client are imported only here, so the rest of dgemma
runs without them.
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """``dgemma.server.app.create_app`` (imported on first use: FastAPI loads only when serving)."""
    from dgemma.server.app import create_app as make

    return make(*args, **kwargs)
