"""A fixed batch of prompts through the engine core, as one generator: for benchmarks and tests that
want every row's events and results in order (``Engine.generate`` is the public way to do this)."""

from __future__ import annotations

from typing import Generator, Sequence

import torch

from dgemma import sampler
from dgemma.core.engine_core import EngineCore
from dgemma.core.request import CanvasEvent, RowResult, StepEvent
from dgemma.params import SamplingParams


def run(model, prompts: Sequence[Sequence[int]], params: SamplingParams, pad_id: int = 0,
        step_events: bool = True, fused: bool = True) -> Generator[StepEvent | CanvasEvent, None, list[RowResult]]:
    """Generate for every row of ``prompts`` (request id = row index); yields the core's events and
    returns a RowResult per row. ``params.initial_canvas`` / ``pinned_canvas`` may give one canvas for all
    rows or one per row. Every row runs at once (one slot each), all prompts in one encoder call."""
    cfg = model.cfg
    n = len(prompts)
    initial = sampler.canvas_rows(params, "initial_canvas", n, cfg.canvas_length, cfg.vocab_size)
    pinned = sampler.canvas_rows(params, "pinned_canvas", n, cfg.canvas_length, cfg.vocab_size)
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    row_params = params.replace(seed=seed, initial_canvas=None, pinned_canvas=None)
    core = EngineCore(model, max_num_seqs=n, pad_id=pad_id, fused=fused, grow=True,
                      max_batched_tokens=max(sum(len(p) for p in prompts), n * cfg.canvas_length))
    reqs = [core.add(list(p), row_params, request_id=b, step_events=step_events,
                     initial=initial[b] if initial else None, pinned=pinned[b] if pinned else None)
            for b, p in enumerate(prompts)]
    while core.has_work():
        yield from core.step()
    return [r.result for r in reqs]
