"""Canvas constraints seen from the engine: ``constraint=`` on ``submit`` / ``generate`` / ``stream``,
``finish`` (what a canvas outputs and commits), and ``RowResult.entropy`` over the free positions."""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma import constraints
from dgemma.constraints import CanvasConstraint
from dgemma.core import CanvasEvent, EngineCore
from test_constraints import KW, _prompt, _run


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)


def test_engine_submit_takes_a_constraint(engine):
    c = engine.config.canvas_length
    fixed = torch.full((c,), -1)
    fixed[1] = 250
    con = constraints.pinned(fixed, canvases=(1,))
    req = engine.submit(_prompt(5, 6), engine.params(seed=9, **KW), constraint=con)
    events = list(engine.events(req))
    assert isinstance(events[-1], CanvasEvent) and req.result.token_ids[c + 1] == 250
    assert req.result.token_ids == _run(engine, _prompt(5, 6), 9, con)[0].token_ids


def test_generate_and_stream_take_a_constraint(engine):
    c = engine.config.canvas_length
    fixed = torch.full((c,), -1)
    fixed[2], fixed[c - 1] = 260, 261
    con = constraints.pinned(fixed, canvases=(1, 2))
    kw = dict(KW, max_new_tokens=3 * c)
    batch = engine.generate([_prompt(5, 6), _prompt(7, 1)], seed=4, constraint=con, **kw)
    for out in batch:
        for k in (1, 2):
            assert out.token_ids[k * c + 2] == 260 and out.token_ids[k * c + c - 1] == 261
    alone = engine.generate(_prompt(7, 1), seed=4, constraint=con, **kw)
    assert alone.token_ids == batch[1].token_ids
    events = list(engine.stream(_prompt(7, 1), seed=4, constraint=con, **kw))
    drafts = [e for e in events if hasattr(e, "draft_tokens") and e.canvas > 0]
    assert drafts and all(e.draft_tokens[2] == 260 and e.draft_tokens[c - 1] == 261 for e in drafts)
    assert events[-1].completion.token_ids == alone.token_ids
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate([_prompt(5, 6), _prompt(7, 1)], constraint=[con], **kw)


class _CutAtTerminator(CanvasConstraint):
    """A toy grammar: token 7 may end the text anywhere; ``finish`` pads everything after the first 7 with 9."""

    def __init__(self):
        self.seen = []

    def finish(self, canvas, tokens):
        self.seen.append((canvas, tokens.clone()))
        hit = (tokens == 7).nonzero()
        if len(hit):
            tokens[int(hit[0]) + 1:] = 9
        return tokens


def test_finish_shapes_the_output_and_what_is_committed(engine):
    c = engine.config.canvas_length
    idx = torch.zeros(c, dtype=torch.long)
    table = torch.zeros(1, engine.config.vocab_size, dtype=torch.bool)
    table[0, [7, 30, 31]] = True
    grammar = _CutAtTerminator()
    con = constraints.Combined(constraints.allowed(idx, table, canvases=(0, 1)), grammar)
    core = EngineCore(engine.model, max_num_seqs=1, grow=True)
    req = core.add(_prompt(5, 2), engine.params(seed=1, **{**KW, "max_new_tokens": 2 * c}), constraint=con)
    slot = None
    while core.has_work():
        core.step()
        slot = req.slot if req.slot is not None else slot
    out = req.result.token_ids
    assert [k for k, _ in grammar.seen] == [0, 1]
    for k, raw in grammar.seen:
        part = out[k * c:(k + 1) * c]
        hit = raw.tolist().index(7) if 7 in raw.tolist() else c
        assert part[: hit + 1] == raw.tolist()[: hit + 1] and all(t == 9 for t in part[hit + 1:])
    assert any(7 in raw.tolist()[:-1] for _, raw in grammar.seen)  # the cut happened, not only in theory
    # the cache holds the finished first canvas, so the second was conditioned on it
    assert core.pool.held[slot][len(_prompt(5, 2)):] == out[:c]

    class Bad(CanvasConstraint):
        def finish(self, canvas, tokens):
            return tokens[:-1]

    core = EngineCore(engine.model, max_num_seqs=1, grow=True)
    core.add([2, 3], engine.params(**KW), constraint=Bad())
    with pytest.raises(ValueError, match="finish must return"):
        while core.has_work():
            core.step()


def test_result_entropy_is_over_the_free_positions(engine):
    c = engine.config.canvas_length
    fixed = torch.full((c,), -1)
    fixed[: c // 2] = 300
    res_free, ev_free = _run(engine, _prompt(5, 2), 2, max_new_tokens=2 * c)
    res_half, ev_half = _run(engine, _prompt(5, 2), 2, constraints.pinned(fixed, canvases=(0, 1)), max_new_tokens=2 * c)
    for res, events, free in ((res_free, ev_free, c), (res_half, ev_half, c // 2)):
        assert len(res.entropy) == 2
        last = [e for e in events if e.canvas == 0][-1]  # no restarts: the kept attempt is the last one
        assert res.entropy[0] == pytest.approx(last.mean_entropy * c / free, rel=1e-6)
