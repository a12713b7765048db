"""The engine core's edge cases against solo runs, and fixed bugs (interrupted generate, commit starvation,
prefix copies blocked by a one-token hit).

Reference for every request: the same request alone on a fresh core (fp32, tiny model).
"""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.core import CanvasEvent, EngineCore

from test_core import KW, _alone, _drain, _prompt

FAST = dict(KW, max_new_tokens=96, stability_threshold=0, confidence_threshold=1e9)  # settles every step


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)


def test_staggered_mixed_batch_with_edge_params_in_a_growing_pool_matches_solo(engine):
    c = engine.config.canvas_length
    pin = torch.full((c,), -1, dtype=torch.long)
    pin[3], pin[10] = 7, 1
    init = torch.randint(0, engine.config.vocab_size, (c,), generator=torch.Generator().manual_seed(0))
    specs = [  # (prompt, seed, params, initial/pinned)
        (_prompt(5, 1), 1, dict(max_new_tokens=20), {}),  # not a multiple of C
        (_prompt(30, 2), 2, dict(max_new_tokens=50, stability_threshold=0, confidence_threshold=0.5, restarts=2,
                                 max_denoising_steps=4), {}),
        (_prompt(40, 4), 4, dict(max_new_tokens=33), dict(pinned=pin)),
        (_prompt(9, 5), 5, dict(max_new_tokens=64, max_denoising_steps=1), dict(initial=init)),
        (_prompt(70, 6), 6, dict(max_new_tokens=17, restarts=1, restart_entropy=0.01, stability_threshold=2,
                                 confidence_threshold=10.0), dict(initial=init, pinned=pin)),
    ]
    core = EngineCore(engine.model, max_num_seqs=5, grow=True, max_batched_tokens=16)  # chunked prefill
    reqs = []
    for i, (p, s, kw, extra) in enumerate(specs):
        reqs.append(core.add(p, engine.params(seed=s, **{**KW, **kw}), **extra))
        for _ in range(i):
            core.step()
    _drain(core)
    assert core.pool.cache.capacity > 2 * c  # the pool grew while requests were running
    for (p, s, kw, extra), r in zip(specs, reqs):
        solo = _alone(engine, p, s, **extra, **kw)
        assert (r.result.token_ids, r.result.steps) == (solo.token_ids, solo.steps)
        assert len(r.result.token_ids) == kw["max_new_tokens"]


def test_eos_edge_cases_pinned_eos_at_position_0_and_one_token(engine):
    c = engine.config.canvas_length
    core = EngineCore(engine.model, max_num_seqs=3, grow=True)
    at0 = core.add(_prompt(5, 1), engine.params(seed=1, **{**KW, "eos_token_id": (1,)}),
                   pinned=torch.where(torch.arange(c) == 0, 1, -1))
    last = core.add(_prompt(8, 4), engine.params(seed=4, **{**KW, "eos_token_id": (1,), "max_new_tokens": 64}),
                    pinned=torch.where(torch.arange(c) == c - 1, 1, -1))
    one = core.add(_prompt(7, 3), engine.params(seed=3, **{**KW, "max_new_tokens": 1}))
    events = [e for e in _drain(core) if isinstance(e, CanvasEvent)]
    assert (at0.result.token_ids, at0.result.finish_reason) == ([], "stop")
    assert len(last.result.token_ids) == c - 1 and last.result.finish_reason == "stop"
    assert len(one.result.token_ids) == 1 and one.result.finish_reason == "length"
    assert all(e.finished and e.canvas == 0 for e in events) and len(events) == 3
    assert core.pool.busy == [False] * core.num_slots


def test_prefix_cache_after_aborts_and_a_whole_prompt_hit_matches_solo(engine):
    core = EngineCore(engine.model, max_num_seqs=3, grow=True, max_batched_tokens=16)
    core.add(_prompt(6, 9), engine.params(seed=9, **KW))
    core.step()
    long = _prompt(50, 1)
    mid = core.add(long, engine.params(seed=1, **KW))
    core.step()
    assert mid.status == "prefill" and 0 < mid.encoded < len(long)
    core.abort(mid.request_id)  # aborted mid-prefill: its slot keeps a valid prefix
    again = core.add(long, engine.params(seed=1, **KW))
    _drain(core)
    assert again.result.cached_tokens == mid.encoded
    assert again.result.token_ids == _alone(engine, long, 1).token_ids
    # prompt + committed canvases: the whole prompt is a hit, the first step denoises at once
    held = long + again.result.committed_ids
    whole = core.add(held, engine.params(seed=4, **KW))
    core.step()
    assert whole.result.cached_tokens == len(held) and whole.result.steps == [1]
    _drain(core)
    assert whole.result.token_ids == _alone(engine, held, 4).token_ids
    # aborted while its finished canvas waits to be committed: the pending canvas is not in the slot
    fast = dict(FAST, max_new_tokens=64)
    a = core.add(_prompt(5, 11), engine.params(seed=1, **fast))
    core.step()
    assert a.status == "commit"
    core.abort(a.request_id)
    follow = _prompt(5, 11) + a.pending.tolist() + [3, 4]
    b = core.add(follow, engine.params(seed=5, **KW))
    _drain(core)
    assert b.result.cached_tokens == 5
    assert b.result.token_ids == _alone(engine, follow, 5).token_ids


def test_cache_rows_permuted_rows_and_mixed_starts_equal_solo_caches(engine):
    m, cfg = engine.model, engine.config
    big = KVCache(cfg, 4, 64)
    pre, p3, p1 = _prompt(5, 7), _prompt(9, 1), _prompt(4, 2)
    m.encode(torch.tensor([pre]), big.rows([1]))
    ids = torch.zeros(2, 9, dtype=torch.long)
    ids[0], ids[1, :4] = torch.tensor(p3), torch.tensor(p1)
    m.encode(ids, big.rows([3, 1]), n_valid=torch.tensor([9, 4]))  # starts 0 and 5, right padding
    assert big.lengths.tolist() == [0, 9, 0, 9]
    s3, s1 = KVCache(cfg, 1, 64), KVCache(cfg, 1, 64)
    m.encode(torch.tensor([p3]), s3)
    m.encode(torch.tensor([pre + p1]), s1)
    for layer in range(len(cfg.layers)):
        torch.testing.assert_close(big.k[layer][3, :, :9], s3.k[layer][0, :, :9], atol=1e-5, rtol=0)
        torch.testing.assert_close(big.v[layer][1, :, :9], s1.v[layer][0, :, :9], atol=1e-5, rtol=0)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length))
    h = m.decode_hidden(canvas, big.rows([1, 3]))
    torch.testing.assert_close(h[0], m.decode_hidden(canvas[:1], s1)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(h[1], m.decode_hidden(canvas[1:], s3)[0], atol=1e-4, rtol=0)


def test_interrupted_generate_leaves_nothing_behind(engine, monkeypatch):
    core = engine.core
    real, calls = core.step, [0]

    def step():
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(core, "step", step)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([_prompt(5, 1), _prompt(6, 2), _prompt(7, 3)], seed=1, **KW)
    monkeypatch.undo()
    left = (core.num_running, core.num_waiting, dict(engine._outbox))
    for rid in core.running_ids() + [r.request_id for r in core.scheduler.waiting]:  # clean up for later tests
        core.abort(rid)
    engine._outbox.clear()
    assert left == (0, 0, {})


def test_commits_share_a_tight_budget(engine):
    core = EngineCore(engine.model, max_num_seqs=2, grow=True, max_batched_tokens=16)  # one canvas per step
    a = core.add(_prompt(5, 1), engine.params(seed=1, **FAST))
    b = core.add(_prompt(5, 2), engine.params(seed=2, **FAST))
    for _ in range(5):
        core.step()
    assert len(a.result.token_ids) > 16 and len(b.result.token_ids) > 16  # b: stuck at 16 until a ends


def test_a_one_token_free_hit_does_not_block_a_long_copy(engine):
    core = EngineCore(engine.model, max_num_seqs=2, grow=True)
    core.add(_prompt(5, 1), engine.params(seed=1, **KW))
    core.add(_prompt(5, 2), engine.params(seed=2, **KW))
    _drain(core)  # both slots now hold something that starts with BOS
    long = _prompt(60, 3)
    core.add(long, engine.params(seed=3, **KW))
    core.step()
    new = core.add(long[:50] + [7, 7], engine.params(seed=4, **KW))
    core.step()
    assert new.result.cached_tokens == 50
