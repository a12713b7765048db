"""Canvas constraints (``dgemma.constraints``): fixed tokens and allowed sets on any canvas, the update hook,
validation, the fused step against the reference and a float64 formula under a mask, and no constraint
giving bitwise the behaviour recorded before constraints existed (``tests/data/constraints_baseline.json``,
recorded at commit b32c70e by :func:`_baseline_runs`: tiny model in fp32)."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import pytest
import torch

import dgemma
from dgemma import constraints, denoise, sampler
from dgemma.constraints import CanvasConstraint, CanvasRule
from dgemma.core import EngineCore, StepEvent

from test_core import _prompt
from test_denoise import _hidden

BASELINE = Path(__file__).resolve().parent / "data" / "constraints_baseline.json"
KW = {"max_new_tokens": 48, "max_denoising_steps": 5, "confidence_threshold": 0.0, "eos_token_id": ()}


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)


def _baseline_runs(engine) -> dict:
    """Tokens, drafts, accepted masks and mean entropies of free, pinned, initial and restarting runs."""
    c = engine.config.canvas_length
    kw = dict(max_new_tokens=3 * c, max_denoising_steps=6, confidence_threshold=0.0, eos_token_id=())
    out = {"generate": [x.token_ids for x in engine.generate(["hello", [2, 9, 9, 40]], seed=11, **kw)]}
    pins = [-1] * c
    pins[0], pins[5] = 300, 301
    adaptive = dict(max_new_tokens=2 * c, max_denoising_steps=5, confidence_threshold=0.3, stability_threshold=0,
                    restarts=2, eos_token_id=())
    for name, extra in {"plain": {}, "pinned": dict(pinned_canvas=pins),
                        "initial_pinned": dict(initial_canvas=list(range(100, 100 + c)), pinned_canvas=pins),
                        "restarts": adaptive}.items():
        out["stream_" + name] = [
            [e.canvas, e.step, e.draft_tokens, e.accepted_mask, e.mean_entropy, e.attempt]
            if hasattr(e, "draft_tokens") else [e.canvas, e.tokens]
            for e in engine.stream("abc", seed=3, **{**kw, **extra})]
    return out


def _fingerprint(engine) -> dict:
    h = hashlib.sha256()
    for name, p in sorted(engine.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    # the CPU's kernel family and the thread count change fp32 accumulation orders, hence the exact floats
    return {"weights": h.hexdigest(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def test_no_constraint_is_bitwise_the_behaviour_before_constraints(engine):
    recorded = json.loads(BASELINE.read_text())
    torch.set_num_threads(1)  # as recorded (the conftest fixture restores the count)
    if recorded["fingerprint"] != _fingerprint(engine):
        pytest.skip("recorded on another torch / CPU / checkpoint: its float rounding may differ")
    assert _baseline_runs(engine) == recorded["runs"]  # tokens, drafts, masks, entropies (exact floats)


def _run(engine, prompt, seed, constraint=None, **kw):
    """(RowResult, its StepEvents) of one request alone on a fresh core."""
    core = EngineCore(engine.model, max_num_seqs=1, grow=True)
    req = core.add(prompt, engine.params(seed=seed, **{**KW, **kw}), step_events=True, constraint=constraint)
    events = []
    while core.has_work():
        events += [e for e in core.step() if isinstance(e, StepEvent)]
    return req.result, events


def _sets(vocab: int, c: int):
    """Three allowed sets and a ``set_index [C]`` using them (-1 on a few positions)."""
    table = torch.zeros(3, vocab, dtype=torch.bool)
    table[0, 10:20] = True
    table[1, [5, 300, 301]] = True
    table[2, ::2] = True
    idx = torch.tensor([0, 1, 2, -1] * (c // 4))
    return idx, table


def test_fixed_tokens_hold_on_canvases_0_1_and_2_in_every_step_and_restart(engine):
    c = engine.config.canvas_length
    rules = {}
    for k in range(3):
        fixed = torch.full((c,), -1)
        fixed[k], fixed[c - 1 - k], fixed[7] = 400 + k, 410 + k, 420 + k
        rules[k] = CanvasRule(fixed=fixed)
    res, steps = _run(engine, _prompt(6, 1), 3, constraints.Rules(rules), max_new_tokens=4 * c,
                      confidence_threshold=1e-12, stability_threshold=0, restarts=1)
    assert {e.canvas for e in steps} == {0, 1, 2, 3} and any(e.attempt == 1 for e in steps)
    for e in steps:
        if e.canvas in rules:
            f = rules[e.canvas].fixed
            assert torch.equal(torch.tensor(e.draft)[f >= 0], f[f >= 0]), (e.canvas, e.step)
    for k, rule in rules.items():
        out = torch.tensor(res.token_ids[k * c:(k + 1) * c])
        assert torch.equal(out[rule.fixed >= 0], rule.fixed[rule.fixed >= 0])
    assert res.token_ids[3 * c + 7] != 420  # canvas 3 is free


def test_allowed_sets_constrain_drafts_samples_and_output(engine, monkeypatch):
    c, vocab = engine.config.canvas_length, engine.config.vocab_size
    idx, table = _sets(vocab, c)
    seen = []
    real = sampler.step

    def spy(model, h, *args, **kw):
        out = real(model, h, *args, **kw)
        mask = args[4] if len(args) > 4 else kw.get("mask")
        seen.append((mask, out))
        return out

    monkeypatch.setattr(sampler, "step", spy)
    res, steps = _run(engine, _prompt(5, 2), 4, constraints.allowed(idx, table, canvases=(0, 2)),
                      max_new_tokens=3 * c)
    on = idx >= 0
    for e in steps:
        if e.canvas in (0, 2):
            assert bool(table[idx[on], torch.tensor(e.draft)[on]].all()), (e.canvas, e.step)
    for k in (0, 2):
        out = torch.tensor(res.token_ids[k * c:(k + 1) * c])
        assert bool(table[idx[on], out[on]].all())
    free = torch.tensor(res.token_ids[c:2 * c])
    assert not bool(table[idx[on], free[on]].all())  # canvas 1 is free (and the model does not like the sets)
    masked = [(m, o) for m, o in seen if m is not None]
    assert len(masked) == 2 * KW["max_denoising_steps"]
    for m, o in masked:  # every accepted sample lies in its set too
        acc = o.accepted[0] & on
        assert bool(table[idx[acc], o.next_x[0].cpu()[acc]].all())


def test_single_token_sets_behave_as_fixed_tokens(engine):
    c, vocab = engine.config.canvas_length, engine.config.vocab_size
    table = torch.zeros(2, vocab, dtype=torch.bool)
    table[0, 33], table[1, 44] = True, True
    idx = torch.full((c,), -1)
    idx[2], idx[9] = 0, 1
    fixed = torch.full((c,), -1)
    fixed[2], fixed[9] = 33, 44
    a = _run(engine, _prompt(5, 3), 5, constraints.allowed(idx, table, canvases=(1,)), max_new_tokens=2 * c)
    b = _run(engine, _prompt(5, 3), 5, constraints.pinned(fixed, canvases=(1,)), max_new_tokens=2 * c)
    assert a[0].token_ids == b[0].token_ids and [e.mean_entropy for e in a[1]] == [e.mean_entropy for e in b[1]]


def _float64_entropy(model, h, temperature, idx, table):
    """Entropy over the allowed tokens, in float64 from the model's logits (``h [n, C, d]``, ``idx [n, C]``)."""
    z = model.logits(h).double() / temperature  # [n, C, V]
    allowed = torch.where((idx >= 0)[..., None], table[idx.clamp(min=0)], True)  # [n, C, V]
    logp = torch.log_softmax(z.masked_fill(~allowed, float("-inf")), -1)
    return -(logp.exp() * logp.masked_fill(~allowed, 0)).sum(-1), z.masked_fill(~allowed, float("-inf")).argmax(-1)


@pytest.mark.parametrize("chunk_bytes", [1, 5 * 4 * 512, None])
@pytest.mark.parametrize("block", [None, 100])
@torch.inference_mode()
def test_fused_equals_reference_and_float64_under_a_mask(ckpt_factory, chunk_bytes, block):
    model = dgemma.load(ckpt_factory("tiny"), dtype=torch.float32).model
    h, u = _hidden(model, seed=4, rows=3)
    c, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    one, table = _sets(vocab, c)
    idx = torch.stack([one, torch.full((c,), -1), one.roll(1)])  # a free row between constrained ones
    for temperature in (0.8, 0.05, torch.tensor([0.8, 0.5, 0.3], dtype=torch.float64)):
        ref = denoise.step_reference(model, h, temperature, u, set_index=idx, table=table)
        out = denoise.step_fused(model, h, temperature, u, chunk_bytes=chunk_bytes, block=block,
                                 set_index=idx, table=table)
        t_min = float(temperature.min()) if isinstance(temperature, torch.Tensor) else temperature
        dz = 8 * model.cfg.final_logit_softcapping / t_min * torch.finfo(torch.float32).eps
        tol = 2 * dz * max(1.0, float(ref.entropy.max()))
        torch.testing.assert_close(out.entropy, ref.entropy, rtol=0, atol=tol)
        assert torch.equal(out.argmax, ref.argmax) and torch.equal(out.sampled, ref.sampled)
        torch.testing.assert_close(out.soft, ref.soft, rtol=0, atol=2 * dz * float(ref.soft.abs().max()))
        t64 = temperature.reshape(-1, 1, 1) if isinstance(temperature, torch.Tensor) else temperature
        h64, top64 = _float64_entropy(model, h, t64, idx, table)
        torch.testing.assert_close(out.entropy.double(), h64, rtol=0, atol=tol)
        assert torch.equal(out.argmax, top64)
        on = idx >= 0
        for tokens in (out.argmax, out.sampled):
            assert bool(table[idx[on], tokens[on]].all())
    free = denoise.step_fused(model, h[1:2], 0.8, u[1:2], chunk_bytes=chunk_bytes, block=block)
    masked = denoise.step_fused(model, h, 0.8, u, chunk_bytes=chunk_bytes, block=block, set_index=idx, table=table)
    if chunk_bytes is None:  # same chunk shapes: the free row is bitwise its unmasked self
        assert torch.equal(masked.entropy[1], free.entropy[0]) and torch.equal(masked.sampled[1], free.sampled[0])


@torch.inference_mode()
def test_a_mask_in_bfloat16(ckpt_factory):
    """The lowest-fp32 fill becomes -inf in bf16 (the soft embedding's softmax): still probability 0."""
    model = dgemma.load(ckpt_factory("tiny"), dtype=torch.bfloat16).model
    h, u = _hidden(model)
    c, vocab = model.cfg.canvas_length, model.cfg.vocab_size
    one, table = _sets(vocab, c)
    idx = torch.stack([one, one.roll(2)])
    ref = denoise.step_reference(model, h, 0.5, u, set_index=idx, table=table)
    out = denoise.step_fused(model, h, 0.5, u, chunk_bytes=3 * 4 * 512, set_index=idx, table=table)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.argmax, ref.argmax) and bool(out.soft.isfinite().all())
    torch.testing.assert_close(out.soft.float(), ref.soft.float(), atol=0.05, rtol=0.02)
    on = idx >= 0
    assert bool(table[idx[on], out.sampled[on]].all()) and bool(table[idx[on], ref.sampled[on]].all())


@torch.inference_mode()
def test_an_all_allowed_mask_is_bitwise_no_mask(ckpt_factory):
    model = dgemma.load(ckpt_factory("tiny"), dtype=torch.float32).model
    h, u = _hidden(model, seed=5)
    n, c = u.shape
    every = constraints.StepMask(fixed=None, set_index=torch.zeros(n, c, dtype=torch.long),
                                 table=torch.ones(1, model.cfg.vocab_size, dtype=torch.bool))
    noise = torch.randint(0, model.cfg.vocab_size, (n, c), generator=torch.Generator().manual_seed(0))
    for fused in (True, False):
        a = sampler.step(model, h, [0.7] * n, [0.1] * n, u, noise, None, fused=fused)
        b = sampler.step(model, h, [0.7] * n, [0.1] * n, u, noise, every, fused=fused)
        assert a.mean_entropy == b.mean_entropy and torch.equal(a.next_x, b.next_x)
        assert torch.equal(a.argmax, b.argmax) and torch.equal(a.soft, b.soft)


def test_a_mixed_batch_gives_each_request_its_solo_tokens(engine):
    c, vocab = engine.config.canvas_length, engine.config.vocab_size
    idx, table = _sets(vocab, c)
    fixed = torch.full((c,), -1)
    fixed[3] = 123  # a position without a set (idx[3] = -1)
    specs = [(_prompt(5, 1), 1, constraints.allowed(idx, table, canvases=(0, 1))),
             (_prompt(9, 2), 2, None),
             (_prompt(7, 3), 3, constraints.Combined(constraints.pinned(fixed, canvases=(1, 2)),
                                                     constraints.allowed(idx, table, canvases=(2,))))]
    core = EngineCore(engine.model, max_num_seqs=3, grow=True)
    reqs = []
    for p, s, con in specs:
        reqs.append(core.add(p, engine.params(seed=s, **KW), constraint=con))
        core.step()  # staggered: rows at different steps and canvases
    while core.has_work():
        core.step()
    for (p, s, con), r in zip(specs, reqs):
        assert r.result.token_ids == _run(engine, p, s, con)[0].token_ids
    third = torch.tensor(reqs[2].result.token_ids[2 * c:])
    assert int(third[3]) == 123 and bool(table[idx[idx >= 0], third[idx >= 0]].all())


class Recorder(CanvasConstraint):
    """Free until step 2 of canvas 0 has run, then position 3 fixed to 77 and position 4 in {88, 89}."""

    def __init__(self, vocab: int, c: int):
        self.calls, self.vocab, self.c = [], vocab, c

    def update(self, canvas, attempt, step, draft):
        self.calls.append((canvas, attempt, step, draft.tolist()))
        if canvas == 0 and step == 2:
            fixed, idx = torch.full((self.c,), -1), torch.full((self.c,), -1)
            fixed[3], idx[4] = 77, 0
            table = torch.zeros(1, self.vocab, dtype=torch.bool)
            table[0, [88, 89]] = True
            return CanvasRule(fixed=fixed, set_index=idx, table=table)
        return None


def test_the_hook_is_called_every_step_and_its_rule_holds_from_the_next_step(engine):
    c, vocab = engine.config.canvas_length, engine.config.vocab_size
    hook = Recorder(vocab, c)
    res, steps = _run(engine, _prompt(6, 4), 6, hook, max_new_tokens=2 * c)
    assert [(k, a, s, d) for k, a, s, d in hook.calls] == [(e.canvas, e.attempt, e.step, e.draft) for e in steps]
    first = [e for e in steps if e.canvas == 0]
    assert [e.draft[3] for e in first[:2]] != [77, 77]  # steps 1-2: free
    assert all(e.draft[3] == 77 and e.draft[4] in (88, 89) for e in first[2:])
    assert res.token_ids[3] == 77 and res.token_ids[4] in (88, 89)
    assert res.token_ids[c + 3] != 77  # canvas 1 starts free again (start() gave no rule)


def test_bad_constraints_are_refused_at_add(engine):
    c, vocab = engine.config.canvas_length, engine.config.vocab_size
    core = EngineCore(engine.model, max_num_seqs=1, grow=True)
    idx, table = _sets(vocab, c)
    empty = table.clone()
    empty[1] = False
    fixed_out = torch.full((c,), -1)
    fixed_out[0] = 500  # position 0 allows only 10..19
    bad = {
        "`fixed` must be": constraints.pinned([1, 2, 3]),
        r"fixed token ids must be in \[0, 512\)": constraints.pinned([vocab] * c),
        r"initial token ids must be in \[0, 512\)": constraints.initial([-1] * c),
        "bool tensor": constraints.allowed(idx, table.float()),
        "`set_index` must be in": constraints.allowed(idx + 1, table),
        "at least one allowed token": constraints.allowed(idx, empty),
        "not in its position's allowed set": constraints.Combined(constraints.pinned(fixed_out),
                                                                  constraints.allowed(idx, table)),
        "both `set_index` and `table`": constraints.Rules({0: CanvasRule(set_index=idx)}),
        "canvas indices": constraints.Rules({-1: CanvasRule(fixed=fixed_out)}),
        "CanvasConstraint": object(),
    }
    for message, con in bad.items():
        with pytest.raises(ValueError, match=message):
            core.add([2, 3], engine.params(**KW), constraint=con)
    assert core.num_waiting == 0


def test_merge_intersects_sets_and_later_fixed_tokens_win():
    a = CanvasRule(fixed=torch.tensor([1, -1, -1, 2]), set_index=torch.tensor([0, 0, -1, -1]),
                   table=torch.tensor([[True, True, True, False]]))
    b = CanvasRule(fixed=torch.tensor([3, -1, -1, -1]), set_index=torch.tensor([-1, 0, 0, -1]),
                   table=torch.tensor([[False, True, True, True]]), initial=torch.tensor([0, 1, 2, 3]))
    m = constraints.merge(a, b)
    assert m.fixed.tolist() == [3, -1, -1, 2] and m.initial.tolist() == [0, 1, 2, 3]
    allowed = [m.table[i].tolist() if i >= 0 else [True] * 4 for i in m.set_index.tolist()]
    assert allowed == [[True, True, True, False], [False, True, True, False], [False, True, True, True],
                       [True] * 4]
