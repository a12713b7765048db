"""The training objective against inference and against transformers (spec section 4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dgemma.cache import KVCache
from dgemma.loading import load_weights
from dgemma.train.data import Example, collate
from dgemma.train.objective import Draw, Objective, ObjectiveConfig, draw, draws, lm_loss_sum, token_counts

from conftest import TINY, write_hf_checkpoint


def _example(prompt_len: int, n_blocks: int, c: int, vocab: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (prompt_len + n_blocks * c,), generator=g).tolist()
    return Example(tuple(ids), prompt_len, c)


def _draw(ex: Example, block: int, t: float, sc: bool, vocab: int, seed: int) -> Draw:
    g = torch.Generator().manual_seed(seed)
    return Draw(t, block, torch.rand(ex.block, generator=g) < t, torch.randint(0, vocab, (ex.block,), generator=g), sc)


@pytest.fixture(scope="module")
def model(ckpt_factory):
    m, cfg, _, _ = load_weights(ckpt_factory("tiny"), dtype=torch.float32)
    return m


@pytest.fixture(scope="module")
def model64(ckpt_factory):
    """float64 weights, for checks whose point is that two computations are the same formula: the fp32
    rounding of different GEMM shapes (which depends on the CPU's kernels) is then out of the way."""
    m, cfg, _, _ = load_weights(ckpt_factory("tiny"), dtype=torch.float64)
    return m


def _assert_grads_close(got: dict, want: dict, tol: float) -> None:
    """Every gradient within ``tol`` of its tensor's largest element (elementwise rtol trips on the small
    elements of sums that cancel, whose rounding follows the kernels' accumulation order)."""
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        err, scale = float((got[name] - want[name]).abs().max()), float(want[name].abs().max())
        assert scale > 0 and err <= tol * scale, f"{name}: max error {err:.1e}, {err / scale:.1e} of the largest"


def _decoder_states(model, batch, draws):
    """The graded decoder pass's final hidden states ``[B, C, d]`` (what the canvas loss reads)."""
    with torch.no_grad():
        return Objective(model, ObjectiveConfig()).eval().canvas_states(batch, draws)[0]


@torch.no_grad()
def test_decoder_pass_equals_inference_with_the_prefix_cached(model64):
    """Block b's canvas sees exactly what inference sees after committing blocks < b: the prompt and the
    clean earlier blocks, sliding layers only the last W-1 of them (context longer than the window).
    In float64: the two are the same sums in other shapes (fp32 differed by 1.3e-6 of the largest element)."""
    model = model64
    cfg = model.cfg
    c, v = cfg.canvas_length, cfg.vocab_size
    exs = [_example(5, 3, c, v, 1), _example(9, 2, c, v, 2)]
    draws = [_draw(exs[0], 2, 0.5, False, v, 3), _draw(exs[1], 1, 0.7, False, v, 4)]
    batch = collate(exs, pad_id=0)
    h = _decoder_states(model, batch, draws)
    for i, (ex, d) in enumerate(zip(exs, draws)):
        start = ex.prefix_len + c * d.block
        assert start > cfg.sliding_window  # the window rule is exercised
        cache = KVCache(cfg, 1, start, device="cpu", dtype=torch.float64)
        model.encode(torch.tensor([ex.ids[:start]]), cache)
        clean = torch.tensor(ex.ids[start: start + c])
        noisy = torch.where(d.replace, d.tokens, clean)
        want = model.decode_hidden(noisy[None], cache)
        assert h.dtype == want.dtype == torch.float64
        # fp32 islands (RMSNorm, RoPE) stay in both: a float64 last-bit difference may flip one rounding there
        torch.testing.assert_close(h[i], want[0], atol=1e-6 * float(want.abs().max()), rtol=0)


def test_block_never_sees_its_own_clean_tokens(model):
    """Strict < rule: changing the clean tokens of block b (or later) leaves block b's decoder pass as is;
    changing a token of block b-1 changes it."""
    cfg = model.cfg
    c, v = cfg.canvas_length, cfg.vocab_size
    ex = _example(4, 3, c, v, 5)
    d = _draw(ex, 1, 1.0, False, v, 6)  # t = 1: every canvas position replaced, nothing clean leaks in
    d = Draw(d.t, d.block, torch.ones(c, dtype=torch.bool), d.tokens, False)
    base = _decoder_states(model, collate([ex], 0), [d])

    def edited(pos):
        ids = list(ex.ids)
        ids[pos] = (ids[pos] + 7) % v
        return _decoder_states(model, collate([Example(tuple(ids), ex.prefix_len, c)], 0), [d])

    own, later, earlier = 4 + c + 3, 4 + 2 * c + 1, 4 + c - 1
    torch.testing.assert_close(edited(own), base, atol=0, rtol=0)
    torch.testing.assert_close(edited(later), base, atol=0, rtol=0)
    assert not torch.allclose(edited(earlier), base)


def test_draws_follow_the_spec_and_are_reproducible():
    ex = Example(tuple(range(4 + 32)), 4, 16)
    cfg = ObjectiveConfig()
    a = draw(ex, seed=3, step=7, slot=2, vocab=100, cfg=cfg)
    b = draw(ex, seed=3, step=7, slot=2, vocab=100, cfg=cfg)
    assert a.t == b.t and a.block == b.block and torch.equal(a.replace, b.replace) and torch.equal(a.tokens, b.tokens)
    many = [draw(ex, 0, s, 0, 100, cfg) for s in range(400)]
    ts = torch.tensor([d.t for d in many])
    assert ts.min() >= 1e-3 and ts.max() < 1 and abs(ts.mean() - 0.5) < 0.05
    assert {d.block for d in many} == {0, 1}
    assert 0.4 < sum(d.self_condition for d in many) / 400 < 0.6
    frac = torch.stack([d.replace.float().mean() for d in many])
    assert torch.corrcoef(torch.stack([ts, frac]))[0, 1] > 0.8  # replacement rate follows t
    never = [draw(ex, 0, s, 0, 100, ObjectiveConfig(self_conditioning_p=0.0)) for s in range(50)]
    assert not any(d.self_condition for d in never)


def test_chunked_lm_loss_equals_full_cross_entropy(model):
    h = torch.randn(37, model.cfg.hidden_size, requires_grad=True)
    t = torch.randint(0, model.cfg.vocab_size, (37,))
    want = F.cross_entropy(model.logits(h), t, reduction="sum")
    (gw,) = torch.autograd.grad(want, h)
    got = lm_loss_sum(model, h, t, chunk_rows=8)
    (gg,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gg, gw)



def test_focal_loss_is_one_minus_p_to_the_gamma_times_the_cross_entropy(model64):
    """``focal_gamma``: each row's cross-entropy times ``(1 - p)^gamma`` (p: the right token's probability),
    value and gradient (through the weight too); 0 is plain cross-entropy. Float64 weights (the sum is
    accumulated in fp32, as every loss sum is)."""
    m = model64
    h = torch.randn(37, m.cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, m.cfg.vocab_size, (37,))
    logits = m.logits(h)
    ce = F.cross_entropy(logits, t, reduction="none")
    p = logits.softmax(-1).gather(1, t[:, None])[:, 0]
    for gamma in (0.5, 2.0):
        want = ((1 - p) ** gamma * ce).sum()
        (gw,) = torch.autograd.grad(want, h, retain_graph=True)
        got = lm_loss_sum(m, h, t, chunk_rows=8, gamma=gamma)
        (gg,) = torch.autograd.grad(got, h)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=0)
        torch.testing.assert_close(gg, gw, rtol=0, atol=1e-4 * float(gw.abs().max()))  # weight detached: far off
        assert got < ce.sum()
    torch.testing.assert_close(lm_loss_sum(m, h, t, 8, 0.0), ce.sum().float(), rtol=1e-6, atol=0)
    # a sure right answer (cross-entropy exactly 0 in fp32) keeps the gradient finite, even for gamma < 1
    sure = torch.tensor([[60.0, 0.0, 0.0], [0.5, 0.2, 0.1]], requires_grad=True)
    head = type("Head", (), {"logits": staticmethod(lambda x: x)})
    assert F.cross_entropy(sure[:1], torch.tensor([0])) == 0
    (g,) = torch.autograd.grad(lm_loss_sum(head, sure, torch.tensor([0, 1]), 8, gamma=0.5), sure)
    assert torch.isfinite(g).all() and g[0].abs().max() < 1e-30


def test_focal_gamma_weights_only_the_canvas_loss(model):
    cfg = model.cfg
    c, v = cfg.canvas_length, cfg.vocab_size
    exs = [_example(6, 2, c, v, 41), _example(5, 3, c, v, 42)]
    ds = [_draw(exs[0], 1, 0.6, False, v, 43), _draw(exs[1], 2, 0.4, False, v, 44)]
    batch = collate(exs, pad_id=0)
    with torch.no_grad():
        plain = Objective(model, ObjectiveConfig())(batch, ds)
        focal = Objective(model, ObjectiveConfig(focal_gamma=2.0))(batch, ds)
    assert 0 < focal[0] < plain[0] and torch.equal(focal[1], plain[1])  # the AR co-loss is not weighted

def test_token_counts():
    exs = [Example(tuple(range(5 + 32)), 5, 16), Example(tuple(range(3 + 16)), 3, 16)]
    assert token_counts(exs) == (32, 36 + 18)
    assert token_counts(exs, 3) == (96, 36 + 18)  # K draws: K canvases per example, one AR pass


def test_several_draws_per_example_are_stratified_and_start_with_the_single_draw():
    ex = Example(tuple(range(4 + 48)), 4, 16)
    cfg = ObjectiveConfig(draws_per_example=4)
    for step in range(50):
        one, four = draw(ex, 1, step, 3, 100, ObjectiveConfig()), draws(ex, 1, step, 3, 100, cfg)
        assert len(four) == 4 and four[0].t == one.t and torch.equal(four[0].replace, one.replace)
        assert torch.equal(four[0].tokens, one.tokens) and four[0].block == one.block
        u = sorted((d.t - cfg.eps) / (1 - cfg.eps) for d in four)  # one level in each quarter of [0, 1)
        assert all(j / 4 - 1e-9 <= x < (j + 1) / 4 + 1e-9 for j, x in enumerate(u))
        assert len({(d.block, tuple(d.tokens.tolist())) for d in four}) == 4  # independent noise


def test_noise_power_skews_noise_levels_and_one_is_the_spec():
    ex = Example(tuple(range(4 + 16)), 4, 16)
    plain, one = ObjectiveConfig(), ObjectiveConfig(noise_power=1.0)
    heavy = ObjectiveConfig(noise_power=2.0)
    ts, th = [], []
    for step in range(400):
        a, b, c = (draw(ex, 0, step, 0, 100, cfg) for cfg in (plain, one, heavy))
        assert a.t == b.t and torch.equal(a.replace, b.replace)
        u = (a.t - plain.eps) / (1 - plain.eps)
        assert c.t == pytest.approx(heavy.eps + (1 - heavy.eps) * u ** 0.5)  # the same u, skewed
        ts.append(a.t)
        th.append(c.t)
    assert abs(sum(ts) / 400 - 0.5) < 0.05 and abs(sum(th) / 400 - 2 / 3) < 0.05  # means of U(0,1), density 2t


def test_k_draws_equal_the_batch_with_each_example_repeated(model):
    """K draws per example share one encoder pass: the diffusion loss and its gradients equal those of a
    batch holding each example K times, one draw each (the AR loss is counted once, not K times)."""
    cfg = model.cfg
    c, v = cfg.canvas_length, cfg.vocab_size
    exs = [_example(6, 3, c, v, 31), _example(9, 2, c, v, 32)]
    ds = [_draw(exs[0], 2, 0.2, True, v, 33), _draw(exs[0], 0, 0.8, False, v, 34),
          _draw(exs[1], 1, 0.5, False, v, 35), _draw(exs[1], 1, 0.9, True, v, 36)]
    got = []
    for batch in (exs, [exs[0], exs[0], exs[1], exs[1]]):
        model.zero_grad()
        diff, ar = Objective(model, ObjectiveConfig())(collate(batch, 0), ds)
        diff.backward()
        got.append((diff.detach(), ar.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    model.zero_grad()
    (d2, ar2, g2), (d1, ar1, g1) = got
    torch.testing.assert_close(d2, d1)
    torch.testing.assert_close(ar2 * 2, ar1)
    _assert_grads_close(g2, g1, tol=1e-5)  # measured 3e-7 across kernel orders (the same sums, other shapes)
    with pytest.raises(ValueError, match="multiple"):
        Objective(model, ObjectiveConfig())(collate(exs, 0), ds[:3])


def _transformers_losses(hf, exs, draws, cfg):
    """The same objective computed with transformers' model: for each example, the encoder over the clean
    tokens before block b fills a DynamicCache (sliding layers keep their last W-1 keys, as at inference),
    the decoder denoises the block from it (twice: a no-grad pass whose logits self-condition the graded
    one), and a separate encoder pass over the whole sequence gives the next-token loss."""
    from transformers.cache_utils import DynamicCache

    c = cfg.canvas_length
    want_diff = want_ar = 0.0
    for ex, d in zip(exs, draws):
        ids = torch.tensor([ex.ids])
        start = ex.prefix_len + c * d.block
        clean = ids[:, start: start + c]
        noisy = torch.where(d.replace, d.tokens, clean[0])[None]
        kw = dict(input_ids=ids[:, :start], decoder_input_ids=noisy, decoder_position_ids=start + torch.arange(c)[None])
        with torch.no_grad():
            first = hf(past_key_values=DynamicCache(config=hf.config), **kw)
        out = hf(past_key_values=DynamicCache(config=hf.config), **kw,
                 self_conditioning_logits=first.logits, self_conditioning_mask=torch.tensor([d.self_condition]))
        want_diff = want_diff + F.cross_entropy(out.logits[0], clean[0], reduction="sum")
        enc = hf.lm_head(hf.model.encoder(input_ids=ids).last_hidden_state).float()
        enc = torch.tanh(enc / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        want_ar = want_ar + F.cross_entropy(enc[0, :-1], ids[0, 1:], reduction="sum")
    return want_diff, want_ar


# Gradients are sums over every token and layer with heavy cancellation, so their fp32 rounding depends on the
# kernels' accumulation order (AVX2 or AVX-512 ATen kernels, MKL's code path, threads): elementwise rtol fails
# on small elements. The tolerance is scaled to each tensor's largest element instead. Measured worst case
# 4e-5 of it (the 4-element router scales, whose sums cancel most; torch 2.13 CPU, under the default and
# ATEN_CPU_CAPABILITY=default/avx2, MKL_CBWR=COMPATIBLE, 1-2 threads); a sliding window one position
# off moves the gradients by ~1 of it and the losses by 0.6-3%.
GRAD_TOL = 5e-4


@pytest.mark.parametrize("window", [16, 128])  # shorter than prompt + earlier blocks; covering everything
def test_loss_and_gradients_match_transformers(tmp_path, window):
    """Losses of a 2-example batch (one self-conditioned) equal the same objective computed with
    transformers' model, and so do the gradients of every parameter. With window 16 the graded blocks
    start past the window, so the sliding layers' block mask (the last W-1 clean positions) is compared."""
    from transformers import DiffusionGemmaForBlockDiffusion

    raw = copy.deepcopy(TINY)
    raw["text_config"]["sliding_window"] = window
    path = write_hf_checkpoint(tmp_path / "ckpt", raw, embed_std=0.3)
    ours, cfg, _, _ = load_weights(path, dtype=torch.float32)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    c, v = cfg.canvas_length, cfg.vocab_size
    exs = [_example(6, 3, c, v, 11), _example(10, 2, c, v, 12)]
    draws = [_draw(exs[0], 2, 0.6, True, v, 13), _draw(exs[1], 1, 0.3, False, v, 14)]
    if window < 128:
        assert all(ex.prefix_len + c * d.block > window for ex, d in zip(exs, draws))  # the window cuts
    diff, ar = Objective(ours, ObjectiveConfig()).train()(collate(exs, 0), draws)
    (diff + ar).backward()
    want_diff, want_ar = _transformers_losses(hf, exs, draws, cfg)
    (want_diff + want_ar).backward()
    # sums of positive cross-entropy terms: no cancellation, fp32 rounding stays near 1e-7 relative
    torch.testing.assert_close(diff, want_diff, atol=0, rtol=1e-5)
    torch.testing.assert_close(ar, want_ar, atol=0, rtol=1e-5)
    want = {}
    for name, p in hf.named_parameters():  # tied encoder/decoder weights are listed once, under either name
        for prefix in ("model.decoder.", "model.encoder.language_model."):
            if name.startswith(prefix) and p.grad is not None:
                want[name.removeprefix(prefix)] = p.grad
    got = {name: p.grad for name, p in ours.named_parameters()}
    assert None not in got.values()  # every parameter gets a gradient, and all of them match
    _assert_grads_close(got, want, GRAD_TOL)


def test_activation_checkpointing_gives_the_same_gradients(model):
    cfg = model.cfg
    c, v = cfg.canvas_length, cfg.vocab_size
    exs = [_example(7, 2, c, v, 21), _example(3, 3, c, v, 22)]
    draws = [_draw(exs[0], 1, 0.4, True, v, 23), _draw(exs[1], 2, 0.9, True, v, 24)]
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        diff, ar = Objective(model, ObjectiveConfig(), checkpoint=ckpt)(collate(exs, 0), draws)
        (diff + ar).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k, ckpt", [(1, False), (2, True)])
def test_no_encoder_loss_runs_the_encoder_only_over_what_the_canvases_read(model64, k, ckpt):
    """``encoder_loss_weight = 0``: the encoder stops at the last position a canvas reads, and the diffusion
    loss and its gradients are those of the full encoder pass (causal attention: the same K/V); also with
    K = 2 draws per example and activation checkpointing."""
    m = model64
    c, v = m.cfg.canvas_length, m.cfg.vocab_size
    exs = [_example(6, 3, c, v, 41), _example(9, 2, c, v, 42)]
    ds = [_draw(exs[0], 1, 0.3, True, v, 43), _draw(exs[1], 0, 0.7, True, v, 44)]
    if k == 2:  # example-major: a second draw of each example, block 0, without self-conditioning
        ds = [ds[0], _draw(exs[0], 0, 0.5, False, v, 45), ds[1], _draw(exs[1], 0, 0.2, False, v, 46)]
    seen, got = [], []
    for weight in (1.0, 0.0):
        m.zero_grad()
        lengths = []
        orig = m.run_layers

        def spy(x, positions, *a, encoder, **kw):
            if encoder:
                lengths.append(x.shape[1])
            return orig(x, positions, *a, encoder=encoder, **kw)

        m.run_layers = spy
        try:
            diff, ar = Objective(m, ObjectiveConfig(encoder_loss_weight=weight), checkpoint=ckpt)(collate(exs, 0), ds)
        finally:
            del m.run_layers
        diff.backward()
        seen.append((lengths, float(ar.detach())))
        got.append((diff.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    m.zero_grad()
    s = max(len(e.ids) for e in exs)
    assert set(seen[0][0]) == {s} and seen[0][1] > 0  # (checkpointing runs the layers again backward)
    # the largest start: example 0's block 1 (the others start at 6 or 9)
    assert set(seen[1][0]) == {6 + c} and seen[1][1] == 0.0
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-12, atol=0)
    _assert_grads_close(got[1][1], got[0][1], tol=1e-10)
