"""The engine core: continuous batching, the KV slot pool and its prefix cache, the token budget, aborts.

The reference for every request is the same request run alone on a fresh core: joining a running batch,
being prefilled in chunks, or taking its prompt from the prefix cache must give the same tokens (fp32,
tiny model; rows of a pass are equal to solo runs up to float rounding, and these seeds sit far from any
decision boundary).
"""

from __future__ import annotations

import pytest
import torch

import dgemma
from dgemma.core import CanvasEvent, EngineCore, StepEvent
from dgemma.core.pool import token_bytes

KW = {"max_new_tokens": 40, "max_denoising_steps": 5, "confidence_threshold": 0.0, "eos_token_id": ()}


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, 400, (n - 1,), generator=g).tolist()


def _alone(engine, prompt, seed, initial=None, pinned=None, **kw):
    """The request's RowResult on a fresh core of its own."""
    core = EngineCore(engine.model, max_num_seqs=1, grow=True)
    req = core.add(prompt, engine.params(seed=seed, **{**KW, **kw}), initial=initial, pinned=pinned)
    while core.has_work():
        core.step()
    return req.result


def _drain(core, until=None) -> list:
    events = []
    while core.has_work() and not (until and until()):
        events += core.step()
    return events


def test_a_request_joins_a_running_batch_and_gets_its_solo_tokens(engine):
    core = EngineCore(engine.model, max_num_seqs=4, kv_cache_bytes=1 << 26)
    long = core.add(_prompt(9, 0), engine.params(seed=1, **{**KW, "max_new_tokens": 64}), step_events=True)
    for _ in range(3):  # mid-canvas
        core.step()
    assert long.status == "denoise" and long.result.steps == [3]
    short = core.add(_prompt(5, 1), engine.params(seed=2, **{**KW, "max_new_tokens": 16}), step_events=True)
    events = core.step()
    # the newcomer was prefilled and denoised in the same step as the running request's 4th step
    assert {(e.request_id, e.step) for e in events if isinstance(e, StepEvent)} == {
        (long.request_id, 4), (short.request_id, 1)}
    assert core.stats.last_rows == 2
    order = [e.request_id for e in _drain(core) if isinstance(e, CanvasEvent) and e.finished]
    assert order == [short.request_id, long.request_id]  # the short one finished first
    assert short.result.token_ids == _alone(engine, _prompt(5, 1), 2, max_new_tokens=16).token_ids
    assert long.result.token_ids == _alone(engine, _prompt(9, 0), 1, max_new_tokens=64).token_ids
    assert core.num_running == 0 and core.pool.slots == 4  # slots were lent and given back, never copied


def test_rows_at_different_steps_and_restarts_match_solo_runs(engine):
    core = EngineCore(engine.model, max_num_seqs=3, grow=True)
    adaptive = {"max_new_tokens": 48, "max_denoising_steps": 6, "confidence_threshold": 0.3,
                "stability_threshold": 0, "restarts": 2, "eos_token_id": ()}
    reqs = []
    for i in range(3):
        reqs.append(core.add(_prompt(4 + 3 * i, 10 + i), engine.params(seed=i, **adaptive)))
        core.step()  # each joins one step after the previous
    _drain(core)
    steps = [r.result.steps for r in reqs]
    assert len({tuple(s) for s in steps}) > 1  # rows really were at different steps
    for i, r in enumerate(reqs):
        assert r.result.token_ids == _alone(engine, _prompt(4 + 3 * i, 10 + i), i, **adaptive).token_ids


def test_prefix_cache_reuses_a_finished_prompt_and_copies_a_running_one(engine, monkeypatch):
    encoded = []
    real = engine.model.encode

    def spy(ids, cache, n_valid=None):
        encoded.append(int(n_valid.sum()) if n_valid is not None else ids.numel())
        return real(ids, cache, n_valid)

    monkeypatch.setattr(engine.model, "encode", spy)
    core = EngineCore(engine.model, max_num_seqs=3, kv_cache_bytes=1 << 26)
    prompt = _prompt(40, 3)
    first = core.add(prompt, engine.params(seed=5, **KW))
    _drain(core)
    assert first.result.cached_tokens == 0
    encoded.clear()
    again = core.add(prompt, engine.params(seed=5, **KW))
    _drain(core)
    assert again.result.cached_tokens == len(prompt) and core.stats.prefix_hit_tokens == len(prompt)
    assert encoded[0] == 16  # no prefill: the first encoder call is the first commit (C = 16)
    assert again.result.token_ids == first.result.token_ids
    # a running request's prompt shares 30 tokens with a new one: they are copied into the new slot
    other = core.add(prompt[:30] + _prompt(12, 4)[1:], engine.params(seed=6, **KW))
    runner = core.add(_prompt(35, 7), engine.params(seed=7, **KW))  # takes the slot that held `prompt`...
    core.step()
    late = core.add(_prompt(35, 7)[:33] + [9, 9], engine.params(seed=8, **KW))
    _drain(core)
    assert other.result.cached_tokens == 30  # the longest prefix among the free slots
    assert late.result.cached_tokens == 33 and runner.result.cached_tokens == 0  # copied from a running slot
    assert late.result.token_ids == _alone(engine, _prompt(35, 7)[:33] + [9, 9], 8).token_ids


def test_long_prompts_are_prefilled_in_chunks_under_the_token_budget(engine):
    core = EngineCore(engine.model, max_num_seqs=2, kv_cache_bytes=1 << 26, max_batched_tokens=16)
    running = core.add(_prompt(6, 0), engine.params(seed=3, **KW))
    core.step()
    long = core.add(_prompt(50, 1), engine.params(seed=4, **KW))
    core.step()
    assert long.status == "prefill" and long.encoded == 16  # 16 per step, while the other one denoises
    assert running.status == "denoise"
    _drain(core)
    assert long.result.token_ids == _alone(engine, _prompt(50, 1), 4).token_ids
    assert running.result.token_ids == _alone(engine, _prompt(6, 0), 3).token_ids


def test_the_kv_budget_sets_the_slots_and_extra_requests_wait(engine):
    cfg = engine.config
    per_slot = token_bytes(cfg, engine.model.dtype) * 128
    core = EngineCore(engine.model, max_num_seqs=8, kv_cache_bytes=2 * per_slot + 1, max_model_len=128)
    assert core.num_slots == 2
    reqs = [core.add(_prompt(5, i), engine.params(seed=i, **KW)) for i in range(3)]
    core.step()
    assert core.num_running == 2 and core.num_waiting == 1 and reqs[2].status == "waiting"
    _drain(core)
    assert all(r.status == "finished" for r in reqs)
    with pytest.raises(ValueError, match="context"):
        core.add(_prompt(100, 0), engine.params(**KW))  # 100 + 3 canvases of 16 > 128
    with pytest.raises(ValueError, match="lower max_model_len"):
        EngineCore(engine.model, kv_cache_bytes=per_slot - 1, max_model_len=128)


def test_abort_frees_the_slot_at_once_and_the_others_go_on(engine):
    core = EngineCore(engine.model, max_num_seqs=2, kv_cache_bytes=1 << 26)
    a = core.add(_prompt(7, 0), engine.params(seed=1, **KW))
    b = core.add(_prompt(7, 1), engine.params(seed=2, **KW))
    core.step()
    assert core.abort(a.request_id) and a.status == "aborted" and a.result.finish_reason == "abort"
    assert core.num_running == 1 and not core.abort(a.request_id)
    events = _drain(core)
    assert all(e.request_id == b.request_id for e in events)
    assert b.result.token_ids == _alone(engine, _prompt(7, 1), 2).token_ids


def test_engine_streams_share_the_core_and_a_closed_stream_aborts(engine):
    kw = dict(KW, seed=3)
    s1, s2 = engine.stream("one", **kw), engine.stream("two two", **kw)
    first = [next(s1), next(s2), next(s1)]
    assert all(hasattr(e, "draft_tokens") for e in first)
    s1.close()  # abandoned mid-canvas: its request is aborted and its slot freed
    rest = list(s2)
    assert rest[-1].completion.token_ids == engine.generate("two two", **kw).token_ids
    assert engine.core.num_running == 0 and engine.core.num_waiting == 0
