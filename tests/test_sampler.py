"""Sampler semantics: entropy-bound acceptance, sampling, stopping, EOS, seeding and batching."""

import math

import pytest
import torch

import dgemma
from dgemma import core, denoise, sampler
from dgemma.engine import CanvasUpdate, StepUpdate


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"))


def test_entropy_bound_accept_rule():
    h = torch.tensor([[0.5, 0.01, 0.3, 0.02, 0.2]])
    # sorted: 0.01, 0.02, 0.2, 0.3, 0.5; sums before each: 0, 0.01, 0.03, 0.23, 0.53
    assert sampler.entropy_bound_accept(h, 0.1).tolist() == [[False, True, False, True, True]]
    assert sampler.entropy_bound_accept(h, 0.25).tolist() == [[False, True, True, True, True]]
    # the lowest-entropy position is always accepted, even when it alone exceeds the bound
    assert sampler.entropy_bound_accept(torch.tensor([[5.0, 3.0]]), 0.1).tolist() == [[False, True]]


def test_token_entropy_matches_categorical():
    logits = 4 * torch.randn(3, 7, 50)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(denoise.token_entropy(torch.log_softmax(logits, -1)), ref, atol=1e-5)


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logp = probs.log().expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    draws = denoise.sample_inverse_cdf(logp.exp(), torch.rand(20000, generator=g))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(freq, probs, atol=0.015)
    one_hot = torch.full((3, 9), -1e9)
    one_hot[torch.arange(3), torch.tensor([4, 0, 8])] = 0
    assert denoise.sample_inverse_cdf(one_hot.exp(), torch.tensor([0.0, 0.5, 0.999999])).tolist() == [4, 0, 8]


def _stream(engine, prompt, **kw):
    events = list(engine.stream(prompt, **kw))
    steps = [e for e in events if isinstance(e, StepUpdate)]
    canvases = [e for e in events if isinstance(e, CanvasUpdate)]
    return steps, canvases


def test_seeded_runs_are_reproducible(engine):
    a = engine.generate("hello", max_new_tokens=40, seed=7)
    b = engine.generate("hello", max_new_tokens=40, seed=7)
    c = engine.generate("hello", max_new_tokens=40, seed=8)
    assert (a.token_ids, a.steps) == (b.token_ids, b.steps)
    assert a.token_ids != c.token_ids


def test_accepted_counts_obey_the_entropy_bound(engine, monkeypatch):
    """Recompute each step's entropies from the decoder's logits and check the accepted count."""
    seen = []
    decode_hidden = engine.model.decode_hidden

    def spy(canvas, cache, soft=None):
        out = decode_hidden(canvas, cache, soft)
        seen.append(engine.model.logits(out))
        return out

    monkeypatch.setattr(engine.model, "decode_hidden", spy)
    bound, n = 0.5, 48
    steps, _ = _stream(engine, "abc", max_new_tokens=16, entropy_bound=bound, seed=1, confidence_threshold=0.0)
    assert len(steps) == len(seen) == n
    counts = set()
    for ev, logits in zip(steps, seen):
        temperature = 0.4 + 0.4 * (n + 1 - ev.step) / n
        h = denoise.token_entropy(torch.log_softmax(logits[0] / temperature, -1)).sort().values
        k = ev.accepted
        assert k >= 1
        assert float(h[: k - 1].sum()) <= bound + 1e-5  # the k-th was admissible...
        if k < len(h):
            assert float(h[:k].sum()) > bound - 1e-5  # ...and the (k+1)-th was not
        assert ev.mean_entropy == pytest.approx(float(h.mean()), rel=1e-4)
        counts.add(k)
    assert len(counts) > 1  # the test exercised more than one acceptance size


def test_fixed_step_count_when_confidence_threshold_is_zero(engine):
    out = engine.generate("x", max_new_tokens=48, max_denoising_steps=5, confidence_threshold=0.0, seed=0)
    assert out.steps == [5, 5, 5]


def test_stable_and_confident_stopping(engine):
    # Confidence always met: with stability 0 a canvas stops after its first step...
    out = engine.generate("x", max_new_tokens=32, confidence_threshold=1e9, stability_threshold=0, seed=0)
    assert out.steps == [1, 1]
    # ...with stability 1 it stops at the first step whose draft equals the previous step's draft.
    steps, _ = _stream(engine, "x", max_new_tokens=16, confidence_threshold=1e9, stability_threshold=1,
                       seed=0, t_max=0.05, t_min=0.05)
    drafts = [e.draft_tokens for e in steps]
    assert len(drafts) >= 2 and drafts[-1] == drafts[-2]
    assert all(drafts[i] != drafts[i - 1] for i in range(1, len(drafts) - 1))


def test_restarts_redo_only_canvases_that_did_not_settle(engine):
    # Never settles (a random model is not that sure): each canvas runs 1 + restarts attempts, all counted.
    never = dict(max_new_tokens=32, max_denoising_steps=3, confidence_threshold=1e-12, seed=5)
    base, again = engine.generate("x", **never), engine.generate("x", restarts=2, **never)
    assert base.steps == [3, 3] and again.steps == [9, 9]
    assert again.token_ids != base.token_ids  # later attempts start from fresh noise
    # Always settles at the first step: restarts change nothing.
    sure = dict(max_new_tokens=32, confidence_threshold=1e9, stability_threshold=0, seed=5)
    a, b = engine.generate("x", **sure), engine.generate("x", restarts=3, **sure)
    assert (a.token_ids, a.steps) == (b.token_ids, b.steps) == (a.token_ids, [1, 1])
    # A batch restarts only its unsettled rows, and each row equals its solo run.
    mixed = dict(max_new_tokens=16, max_denoising_steps=4, confidence_threshold=1.0, restarts=2, seed=7)
    prompts = ["a", "b b b", [2, 9, 9]]
    batch = engine.generate(prompts, **mixed)
    for prompt, got in zip(prompts, batch):
        alone = engine.generate(prompt, **mixed)
        assert (got.token_ids, got.steps) == (alone.token_ids, alone.steps)
    with pytest.raises(ValueError, match="restarts"):
        engine.generate("x", restarts=-1)


def test_restart_after_gives_up_unsettled_attempts_on_the_full_schedule(engine):
    never = dict(max_new_tokens=32, max_denoising_steps=4, confidence_threshold=1e-12, seed=5, eos_token_id=())
    # attempts 0 and 1 are given up after 2 steps; the last attempt (no restart left) runs to the cap
    got = engine.generate("x", restarts=2, restart_after=2, **never)
    assert got.steps == [2 + 2 + 4, 2 + 2 + 4]
    steps, _ = _stream(engine, "x", restarts=2, restart_after=2, **never)
    assert [(e.canvas, e.attempt) for e in steps if e.step in (2, 3, 5)] == [(c, a) for c in (0, 1) for a in range(3)]
    # the given-up attempt took the first steps of the 4-step schedule, not a 2-step schedule's
    plain, _ = _stream(engine, "x", **never)
    short, _ = _stream(engine, "x", **{**never, "max_denoising_steps": 2})
    first = [(e.draft_tokens, e.mean_entropy) for e in steps if e.canvas == 0][:2]
    assert first == [(e.draft_tokens, e.mean_entropy) for e in plain if e.canvas == 0][:2]
    assert first[1][1] != [e.mean_entropy for e in short if e.canvas == 0][1]  # 2nd step: T 0.7, not 0.4
    # with no restarts, or past the cap, it changes nothing; a canvas that settles first is not affected
    for kw in ({"restart_after": 2}, {"restarts": 2, "restart_after": 4}, {"restarts": 2, "restart_after": 9}):
        assert engine.generate("x", **never, **kw).steps == engine.generate("x", **never, restarts=kw.get(
            "restarts", 0)).steps
    sure = dict(max_new_tokens=32, confidence_threshold=1e9, stability_threshold=0, seed=5, restarts=3)
    assert engine.generate("x", restart_after=1, **sure).steps == [1, 1]
    with pytest.raises(ValueError, match="restart_after"):
        engine.generate("x", restart_after=0)


def _attempts_and_kept(engine, **kw):
    """Per canvas: the (final mean entropy, argmax canvas) of each attempt, and the committed canvas."""
    attempts, kept = {}, {}
    for u in engine.stream("x", eos_token_id=(), **kw):
        if isinstance(u, StepUpdate):
            attempts.setdefault(u.canvas, {})
            attempts[u.canvas][u.step] = (u.mean_entropy, u.draft_tokens)
            steps = kw.get("max_denoising_steps")
            assert steps is None or u.attempt == (u.step - 1) // steps  # steps count across attempts
        else:
            kept[u.canvas] = u.tokens
    return attempts, kept


def test_restarts_keep_the_most_confident_attempt(engine):
    # No attempt settles: the kept canvas is the attempt with the lowest final mean entropy, not the last.
    never = dict(max_new_tokens=32, max_denoising_steps=3, confidence_threshold=1e-12, restarts=3, seed=11)
    attempts, kept = _attempts_and_kept(engine, **never)
    for c, by_step in attempts.items():
        finals = [by_step[s] for s in (3, 6, 9, 12)]  # each attempt's last step; steps count all attempts
        assert kept[c] == min(finals, key=lambda f: f[0])[1]
    # restart_entropy: canvases that settle at the first step are restarted unless that sure, and the most
    # confident of the attempts is kept; a bar above every entropy changes nothing.
    sure = dict(max_new_tokens=32, confidence_threshold=1e9, stability_threshold=0, seed=5, restarts=3)
    attempts, kept = _attempts_and_kept(engine, restart_entropy=1e-30, **sure)
    for c, by_step in attempts.items():
        assert sorted(by_step) == [1, 2, 3, 4]
        assert kept[c] == min(by_step.values(), key=lambda f: f[0])[1]
    plain, loose = engine.generate("x", **sure), engine.generate("x", restart_entropy=1e9, **sure)
    assert (plain.token_ids, plain.steps) == (loose.token_ids, loose.steps) == (plain.token_ids, [1, 1])
    # A bar between attempts' entropies: a row stops restarting at the first attempt below it.
    by_step = attempts[0]
    bar = sorted(h for h, _ in by_step.values())[1] * 1.0000001  # the two lowest qualify
    first_ok = min(s for s, (h, _) in by_step.items() if h < bar)
    got = engine.generate("x", eos_token_id=(), restart_entropy=bar, **{**sure, "max_new_tokens": 16})
    assert got.steps == [first_ok] and got.token_ids == by_step[first_ok][1]
    with pytest.raises(ValueError, match="restart_entropy"):
        engine.generate("x", restart_entropy=0)


def test_eos_ends_the_row_and_output_respects_max_new_tokens(engine):
    base = engine.generate("hello", max_new_tokens=48, seed=3, eos_token_id=())
    assert len(base.token_ids) == 48 and base.finish_reason == "length"
    stop_tok = base.token_ids[20]
    first = base.token_ids.index(stop_tok)
    out = engine.generate("hello", max_new_tokens=48, seed=3, eos_token_id=[stop_tok])
    assert out.token_ids == base.token_ids[:first] and out.finish_reason == "stop"
    assert len(out.steps) == first // 16 + 1  # no canvas after the one holding the EOS
    odd = engine.generate("hello", max_new_tokens=21, seed=3, eos_token_id=())
    assert odd.token_ids == base.token_ids[:21] and odd.steps == base.steps[:2]


def test_batched_equals_one_by_one(engine):
    prompts = ["a", "a much longer prompt than the others, past the window", [2, 9, 9, 9]]
    params = dict(max_new_tokens=40, seed=11)
    eos = engine.generate(prompts[0], **params).token_ids[5]  # makes some rows stop early
    batch = engine.generate(prompts, eos_token_id=[eos], **params)
    for prompt, got in zip(prompts, batch):
        alone = engine.generate(prompt, eos_token_id=[eos], **params)
        assert (got.token_ids, got.steps, got.finish_reason) == (alone.token_ids, alone.steps, alone.finish_reason)
    assert len({tuple(c.steps) for c in batch}) > 1 or len({c.finish_reason for c in batch}) > 1


def test_initial_canvas_is_used_and_validated(engine):
    c = engine.config.canvas_length
    canvas = list(range(10, 10 + c))
    steps, _ = _stream(engine, "q", max_new_tokens=c, initial_canvas=canvas, max_denoising_steps=1,
                       t_max=1e-4, t_min=1e-4)
    # one step from a fixed canvas at ~zero temperature is deterministic: same as any seed
    steps2, _ = _stream(engine, "q", max_new_tokens=c, initial_canvas=canvas, max_denoising_steps=1,
                        t_max=1e-4, t_min=1e-4, seed=123)
    assert steps[0].draft_tokens == steps2[0].draft_tokens
    with pytest.raises(ValueError, match="initial_canvas"):
        engine.generate("q", initial_canvas=[1, 2, 3])
    with pytest.raises(ValueError, match="initial_canvas"):
        engine.generate("q", initial_canvas=[10_000] * c)
    with pytest.raises(ValueError, match="initial_canvas"):
        engine.generate(["q", "r"], initial_canvas=[canvas] * 3)


def test_tokens_per_step_accounting(engine):
    out = engine.generate("hello", max_new_tokens=32, seed=2, eos_token_id=())
    assert out.tokens_per_step == pytest.approx(32 / sum(out.steps))
    assert math.ceil(32 / engine.config.canvas_length) == len(out.steps)


def test_rows_stopping_at_the_last_step_beside_rows_that_do_not(ckpt_factory):
    """A batch where some rows meet the stopping rule exactly at the last step and others do not (the
    last step computes no self-conditioning input, so nothing may be carried past it)."""
    import statistics

    import dgemma
    from dgemma import core

    engine = dgemma.load(ckpt_factory("tiny"))
    prompts = [[2, 10 + i, 20 + 3 * i] for i in range(8)]
    # one step (the last one) and no stability requirement: the entropy threshold alone stops a row
    kw = {"max_new_tokens": 16, "max_denoising_steps": 1, "stability_threshold": 0, "seed": 0}
    # the rows' mean entropies at the last step; a confidence threshold between them splits the batch there
    params = engine.params(confidence_threshold=0.0, **kw)
    events = [e for e in core.run(engine.model, prompts, params) if isinstance(e, core.StepEvent)]
    last = sorted(e.mean_entropy for e in events if e.step == 1)
    assert len(last) == 8 and last[0] < last[-1]
    kw["confidence_threshold"] = statistics.median(last)
    outs = engine.generate(prompts, **kw)  # rows that stop at the last step beside rows that do not
    solo = [engine.generate(p, **kw) for p in prompts]
    assert [o.token_ids for o in outs] == [s.token_ids for s in solo]


def test_pinned_canvas_holds_its_tokens_and_leaves_the_rest_free(engine):
    c = engine.config.canvas_length
    pins = [-1] * c
    pins[0], pins[5], pins[c - 1] = 300, 301, 302
    free = engine.generate(["q", "another prompt"], max_new_tokens=2 * c, seed=4, eos_token_id=())
    steps, canvases = _stream(engine, "q", max_new_tokens=2 * c, seed=4, eos_token_id=(), pinned_canvas=pins)
    for s in [s for s in steps if s.canvas == 0]:  # every step's draft of the first canvas holds the pins
        assert [s.draft_tokens[i] for i in (0, 5, c - 1)] == [300, 301, 302]
    assert [canvases[0].tokens[i] for i in (0, 5, c - 1)] == [300, 301, 302]
    assert [canvases[1].tokens[i] for i in (0, 5, c - 1)] != [300, 301, 302]  # only the first canvas is pinned
    # -1 everywhere pins nothing: the same tokens as a free run; rows of a batch take their own pins
    none = engine.generate(["q", "another prompt"], max_new_tokens=2 * c, seed=4, eos_token_id=(),
                           pinned_canvas=[-1] * c)
    assert [x.token_ids for x in none] == [x.token_ids for x in free]
    rows = engine.generate(["q", "another prompt"], max_new_tokens=c, seed=4, eos_token_id=(),
                           pinned_canvas=[pins, [7] * c])
    assert [rows[0].token_ids[i] for i in (0, 5, c - 1)] == [300, 301, 302] and rows[1].token_ids == [7] * c
    for bad in ([1, 2, 3], [-2] * c, [10_000] * c, "abc"):
        with pytest.raises(ValueError, match="pinned_canvas"):
            engine.generate("q", pinned_canvas=bad)
