"""The fused, chunked denoising step against the full-logits reference step (and the sampler on both)."""

import pytest
import torch

import dgemma
from dgemma import denoise, sampler
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
@torch.inference_mode()
def test_fused_step_matches_reference(ckpt_factory, name, chunk_bytes):
    model = dgemma.load(ckpt_factory(name)).model
    h, u = _hidden(model)
    for temperature in (0.8, 0.05):
        ref = denoise.step_reference(model, h, temperature, u)
        out = denoise.step_fused(model, h, temperature, u, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-4, rtol=1e-4)
        assert torch.equal(out.argmax, ref.argmax)
        assert torch.equal(out.sampled, ref.sampled)
        torch.testing.assert_close(out.soft, ref.soft, atol=2e-4, rtol=1e-4)  # |soft| ~ 8: matmul order
    assert denoise.step_fused(model, h, 0.8, u, soft=False).soft is None


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
    runs = [sampler.run(engine.model, prompts, params, step_events=False, fused=f) for f in (True, False)]
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
