"""``parallel_attempts``: several attempts of a canvas as rows of one decoder pass, reading one KV slot.

The attempt budget (``1 + restarts``) and the choice of the kept attempt are those of attempts run one
after another; the first attempt that qualifies ends the canvas, so it can end after fewer passes.
"""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.constraints import CanvasConstraint, CanvasRule
from dgemma.core import EngineCore, StepEvent

NEVER = {"max_new_tokens": 16, "max_denoising_steps": 5, "confidence_threshold": 1e-12, "eos_token_id": ()}


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)


class PinOneAttempt(CanvasConstraint):
    """Attempt ``which`` of every canvas has all its tokens fixed (it settles at once, entropy 0); the others
    are free (a random model never settles below a confidence threshold of 1e-12)."""

    def __init__(self, tokens: torch.Tensor, which: int):
        self.tokens, self.which, self.calls = tokens, which, []

    def start(self, canvas: int, attempt: int) -> CanvasRule | None:
        self.calls.append(("start", attempt))
        return CanvasRule(fixed=self.tokens) if attempt == self.which else None

    def update(self, canvas: int, attempt: int, step: int, draft: torch.Tensor) -> CanvasRule | None:
        self.calls.append(("update", attempt))
        return None


def _run(engine, prompt, constraint=None, **kw):
    """(result, step events, the core's row-steps) of one request on a fresh core."""
    core = EngineCore(engine.model, max_num_seqs=1, grow=True)
    req = core.add(prompt, engine.params(**{**NEVER, **kw}), step_events=True, constraint=constraint)
    events = []
    while core.has_work():
        events += core.step()
    return req.result, [e for e in events if isinstance(e, StepEvent)], core.stats.denoise_steps


def test_the_first_attempt_that_qualifies_ends_the_canvas(engine):
    c = engine.config.canvas_length
    tokens = torch.arange(10, 10 + c)
    kw = {"seed": 3, "restarts": 3, "restart_entropy": 1e-6, "max_new_tokens": c}
    one, one_steps, _ = _run(engine, [2, 7, 9], PinOneAttempt(tokens, 1), **kw)
    two, two_steps, rows = _run(engine, [2, 7, 9], PinOneAttempt(tokens, 1), parallel_attempts=2, **kw)
    assert one.token_ids == two.token_ids == tokens.tolist()
    assert one.steps == [5 + 2]  # attempt 0 runs to the cap, then attempt 1 settles at its 2nd step
    assert two.steps == [2] and rows == 4  # both at once: attempt 1 settles at the 2nd pass, attempt 0 is dropped
    assert [(e.step, e.attempt) for e in two_steps] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert two_steps[3].draft == tokens.tolist() and two_steps[3].mean_entropy == 0.0


def test_the_attempt_budget_and_the_kept_attempt_are_those_of_restarts(engine):
    kw = {"seed": 5, "restarts": 2}
    result, steps, rows = _run(engine, [2, 5], parallel_attempts=2, **kw)
    # lanes: attempts 0 and 1 side by side (5 passes), then attempt 2 alone (5 more); none settles
    assert result.steps == [10] and rows == 15
    assert sorted({e.attempt for e in steps}) == [0, 1, 2]
    last = {}
    for e in steps:
        last[e.attempt] = (e.mean_entropy, e.draft)
    kept = min(last.values(), key=lambda t: t[0])[1]  # the most confident attempt
    assert result.token_ids == kept
    # more lanes than attempts: no more rows than 1 + restarts, and no change with a single attempt
    alone, _, _ = _run(engine, [2, 5], seed=5)
    wide, _, wide_rows = _run(engine, [2, 5], seed=5, parallel_attempts=4)
    assert (wide.token_ids, wide.steps, wide_rows) == (alone.token_ids, alone.steps, 5)
    again, _, _ = _run(engine, [2, 5], parallel_attempts=2, **kw)
    assert (again.token_ids, again.steps) == (result.token_ids, result.steps)  # seeded: the same run


def test_restart_after_replaces_a_given_up_lane_while_attempts_remain(engine):
    result, steps, rows = _run(engine, [2, 5], seed=1, restarts=3, restart_after=2, max_denoising_steps=4,
                               parallel_attempts=2)
    # attempts 0, 1 given up after 2 passes; attempts 2, 3 (the last two) run to the cap: 2 + 4 passes
    assert result.steps == [6] and rows == 12
    assert [(e.step, e.attempt) for e in steps if e.step in (2, 3)] == [(2, 0), (2, 1), (3, 2), (3, 3)]
    # one attempt left for two given-up lanes: the first lane takes it, the second keeps its attempt running
    result, steps, rows = _run(engine, [2, 5], seed=1, restarts=2, restart_after=2, max_denoising_steps=4,
                               parallel_attempts=2)
    assert [(e.step, e.attempt) for e in steps] == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 2), (3, 1), (4, 2), (4, 1),
                                                    (5, 2), (6, 2)]
    assert result.steps == [6] and rows == 10


def test_lanes_of_several_requests_share_a_pass_and_each_gets_its_solo_tokens(engine):
    kw = dict(NEVER, max_new_tokens=32, restarts=3, confidence_threshold=0.5, stability_threshold=0,
              parallel_attempts=2)
    prompts = [[2, 9, 9, 4], [2, 30, 31]]
    core = EngineCore(engine.model, max_num_seqs=2, grow=True)
    reqs = [core.add(p, engine.params(seed=i, **kw)) for i, p in enumerate(prompts)]
    core.step()
    assert core.stats.last_rows == 4 and core.pool.slots == 2  # two lanes each, one KV slot each
    while core.has_work():
        core.step()
    for i, (p, r) in enumerate(zip(prompts, reqs)):
        alone, _, _ = _run(engine, p, seed=i, **kw)
        assert (r.result.token_ids, r.result.steps) == (alone.token_ids, alone.steps)


def test_parallel_attempts_through_generate_and_its_errors(engine):
    out = engine.generate("x", seed=2, restarts=1, parallel_attempts=2, **NEVER)
    assert out.steps == [5]  # two attempts, one pass each step
    with pytest.raises(ValueError, match="parallel_attempts"):
        engine.generate("x", parallel_attempts=0)
