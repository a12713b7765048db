"""The fused, chunked denoising step against the full-logits reference step (and the sampler on both)."""

import pytest
import torch
import torch.nn.functional as F

import dgemma
from dgemma import core, denoise, sampler
from dgemma.cache import KVCache
from dgemma.params import SamplingParams


def _hidden(model, seed=0, rows=2):
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(cfg, rows, 64, dtype=model.dtype)
    model.encode(torch.randint(3, cfg.vocab_size, (rows, 9), generator=g), cache)
    canvas = torch.randint(0, cfg.vocab_size, (rows, cfg.canvas_length), generator=g)
    u = torch.rand(rows, cfg.canvas_length, generator=g)
    return model.decode_hidden(canvas, cache), u


@pytest.mark.parametrize("name", ["tiny", "odd"])
@pytest.mark.parametrize("chunk_bytes", [1, 5 * 4 * 512, None])  # one position per chunk, ragged, default
@pytest.mark.parametrize("block", [None, 100])  # LM head in one block, or in ragged vocabulary blocks
@torch.inference_mode()
def test_fused_step_matches_reference(ckpt_factory, name, chunk_bytes, block):
    """Tolerances from the logits' rounding, not from one CPU's kernels: the two paths' tempered logits
    differ by up to ``dz = 8 cap eps / T`` (see the soft-cap test below), which moves an entropy by at most
    ``2 dz H`` and the soft embedding by about ``2 dz`` of its magnitude (measured 5-50x below these
    bounds across kernel orders; torch 2.13 CPU, ATEN_CPU_CAPABILITY=default/avx2, MKL_CBWR=COMPATIBLE)."""
    model = dgemma.load(ckpt_factory(name)).model
    h, u = _hidden(model)
    for temperature in (0.8, 0.05):
        ref = denoise.step_reference(model, h, temperature, u)
        out = denoise.step_fused(model, h, temperature, u, chunk_bytes=chunk_bytes, block=block)
        dz = 8 * model.cfg.final_logit_softcapping / temperature * torch.finfo(torch.float32).eps
        torch.testing.assert_close(out.entropy, ref.entropy, rtol=0,
                                   atol=2 * dz * max(1.0, float(ref.entropy.max())))
        assert torch.equal(out.argmax, ref.argmax)
        assert torch.equal(out.sampled, ref.sampled)
        torch.testing.assert_close(out.soft, ref.soft, rtol=0, atol=2 * dz * float(ref.soft.abs().max()))
    assert denoise.step_fused(model, h, 0.8, u, soft=False).soft is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_tempered_logits_blocks_and_soft_cap(ckpt_factory, dtype):
    """Blocked LM head == one block, and the sigmoid form of the soft-cap == the tanh form (to rounding:
    an absolute error of a few ``cap * eps / T``, what tanh's own rounding gives at the cap)."""
    model = dgemma.load(ckpt_factory("odd"), dtype=dtype).model
    h, _ = _hidden(model)
    flat, head, cap = h.reshape(-1, h.shape[-1]), model.embed_tokens, model.cfg.final_logit_softcapping
    for temperature in (1.0, 0.05):
        tol = dict(rtol=0, atol=8 * cap / temperature * torch.finfo().eps)
        whole = denoise.tempered_logits(flat, head, cap, temperature)
        torch.testing.assert_close(denoise.tempered_logits(flat, head, cap, temperature, block=64), whole, **tol)
        ref = model.logits(flat) / temperature  # tanh soft-cap
        assert ref.abs().max() > 0.5 * cap / temperature  # the cap is reached: both ends of tanh are tested
        torch.testing.assert_close(whole, ref, **tol)
        assert torch.equal(denoise.tempered_logits(flat, head, None, temperature),
                           F.linear(flat, head.weight).float() / temperature)


@torch.inference_mode()
def test_fused_entropy_of_peaked_rows():
    """From flat rows to one-hot ones (entropy 5 nats down to 1e-34), the fused formula's error against
    an fp64 computation is the reference formula's, to 1e-5 relative: thresholds such as 1e-12 nats see
    the same entropies on both paths."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 1000, generator=g) * torch.logspace(0, 2.5, 64)[:, None]
    logp = torch.log_softmax(z.double(), -1)
    exact = -(logp.exp() * logp).sum(-1)
    p = torch.softmax(z, -1)
    top = z.argmax(-1, keepdim=True)
    fused = denoise.entropy_from_softmax(p, z.clone(), top).double()
    reference = denoise.token_entropy(torch.log_softmax(z, -1)).double()
    assert exact.min() < 1e-30 and exact.max() > 5
    seen = exact > 1e-35  # below, fp32 probabilities underflow on both paths
    err_fused, err_ref = ((fused - exact).abs() / exact)[seen], ((reference - exact).abs() / exact)[seen]
    assert (err_fused <= err_ref + 1e-5).all()
    assert err_fused.median() < 1e-6


@torch.inference_mode()
def test_fused_step_matches_reference_in_bfloat16(ckpt_factory):
    model = dgemma.load(ckpt_factory("tiny"), dtype=torch.bfloat16).model
    h, u = _hidden(model)
    ref = denoise.step_reference(model, h, 0.5, u)
    out = denoise.step_fused(model, h, 0.5, u, chunk_bytes=3 * 4 * 512)
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.argmax, ref.argmax)
    assert (out.sampled == ref.sampled).float().mean() > 0.95  # bf16 logits: rare ties at a CDF boundary
    assert out.soft.dtype == torch.bfloat16
    torch.testing.assert_close(out.soft.float(), ref.soft.float(), atol=0.05, rtol=0.02)


@torch.inference_mode()
def test_sampler_gives_the_same_tokens_on_both_paths(ckpt_factory):
    engine = dgemma.load(ckpt_factory("tiny"))
    params = SamplingParams(max_new_tokens=40, seed=3, eos_token_id=(), max_denoising_steps=6)
    prompts = [[2, 5, 6, 7], [2, 9]]
    runs = [core.run(engine.model, prompts, params, step_events=False, fused=f) for f in (True, False)]
    results = []
    for loop in runs:
        while True:
            try:
                next(loop)
            except StopIteration as stop:
                results.append(stop.value)
                break
    fused, reference = results
    assert [r.token_ids for r in fused] == [r.token_ids for r in reference]
    assert [r.steps for r in fused] == [r.steps for r in reference]


@pytest.mark.parametrize("fused", [True, False])
def test_per_row_temperatures_equal_one_temperature_per_call(ckpt_factory, fused):
    """Rows of one pass may be at different steps: each row's results with a per-row temperature are
    bitwise those of the same call with that row's temperature as one number (the factor is rounded to
    fp32 once, as a Python number is)."""
    engine = dgemma.load(ckpt_factory("tiny"), dtype=torch.float32)
    model = engine.model
    c, d = model.cfg.canvas_length, model.cfg.hidden_size
    h = torch.randn(3, c, d, generator=torch.Generator().manual_seed(0))
    u = torch.rand(3, c, generator=torch.Generator().manual_seed(1))
    temps = [0.8, 0.4 + 0.4 * 7 / 48, 0.41]
    step = denoise.step_fused if fused else denoise.step_reference
    mixed = step(model, h, torch.tensor(temps, dtype=torch.float64), u)
    for i, t in enumerate(temps):
        one = step(model, h, t, u)  # the same shapes: only the temperature's form differs
        for name in ("entropy", "argmax", "sampled", "soft"):
            assert torch.equal(getattr(mixed, name)[i], getattr(one, name)[i]), (name, t)
