"""Numerical parity with transformers 5.23's DiffusionGemma (the oracle), through dgemma's own loader.

Tolerances are relative to the largest element of what is compared (``_close``), never absolute: fp32
rounding differs with the kernels' accumulation order (AVX2 against AVX-512, MKL's code path), and the
comparisons run both in fp32 (the dtype users run on a CPU) and in float64, where the formulas are the point.
Both implementations keep fp32 islands in a float64 model (RMSNorm, RoPE tables, router softmax, logits);
there the remaining difference (measured 2.4e-6 of the largest logit; transformers multiplies the norm
weight in fp32, dgemma in the model dtype) is fixed by where each rounds to fp32, not by any kernel
order. In fp32 it measured up to 2.2e-6 across kernel orders (torch 2.13 CPU, under the default and
ATEN_CPU_CAPABILITY=default/avx2, MKL_CBWR=COMPATIBLE). A swapped or ignored tensor moves results by O(1).
"""

import pytest
import torch

import dgemma
from dgemma.cache import KVCache

REL = 2e-5  # of the compared tensor's largest element


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    """``max |got - want| <= rel * max |want|``, compared in float64."""
    err, scale = (got.double() - want.double()).abs().max(), want.double().abs().max()
    assert err <= rel * scale, f"max error {float(err):.2e}, {float(err / scale):.1e} of the largest element"


def _hf_cache(hf):
    from transformers import DynamicCache

    return DynamicCache(config=hf.config.get_text_config(decoder=True))


def _setup(ckpt_factory, hf_model_factory, name, dtype=torch.float32, **kw):
    path = ckpt_factory(name, **kw)
    return hf_model_factory(path, dtype), dgemma.load(path, dtype=dtype).model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["tiny", "odd"])
@pytest.mark.parametrize("prompt_len", [5, 40])  # shorter and longer than the sliding window (16 / 7)
def test_encoder_and_decoder_match_reference(ckpt_factory, hf_model_factory, name, prompt_len, dtype):
    hf, model = _setup(ckpt_factory, hf_model_factory, name, dtype)
    cfg = model.cfg
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(0, cfg.vocab_size, (2, prompt_len), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (2, cfg.canvas_length), generator=g)
    sc = 3 * torch.randn(2, cfg.canvas_length, cfg.vocab_size, generator=g, dtype=dtype)
    with torch.no_grad():
        ref_cache = _hf_cache(hf)
        ref_h = hf.model.encoder(input_ids=ids, past_key_values=ref_cache).last_hidden_state
        cache = KVCache(cfg, 2, prompt_len + cfg.canvas_length, dtype=dtype)
        h = model.encode(ids, cache)
        assert h.dtype == ref_h.dtype == dtype
        _close(h, ref_h)
        for i in range(cfg.num_hidden_layers):
            # the reference's dynamic cache keeps only the last W-1 positions on sliding layers
            ref_k, ref_v = ref_cache.layers[i].keys, ref_cache.layers[i].values
            n = ref_k.shape[2]
            assert ref_k.shape[1] == cfg.layers[i].num_kv_heads and ref_k.shape[3] == cfg.layers[i].head_dim
            _close(cache.k[i][:, :, prompt_len - n:prompt_len], ref_k)
            _close(cache.v[i][:, :, prompt_len - n:prompt_len], ref_v)

        plain_ref = hf(decoder_input_ids=canvas, past_key_values=ref_cache).logits
        plain = model.decode(canvas, cache)
        _close(plain, plain_ref)
        assert plain.abs().max() > 0.05  # not trivially zero

        with_sc_ref = hf(decoder_input_ids=canvas, past_key_values=ref_cache, self_conditioning_logits=sc).logits
        with_sc = model.decode(canvas, cache, sc)
        _close(with_sc, with_sc_ref)
        assert (with_sc - plain).abs().max() > 1e-3  # self-conditioning changes the logits

        off = model.decode(canvas, cache, sc, sc_mask=torch.tensor([False, True]))
        assert torch.equal(off[0], plain[0])  # a masked-off row is exactly the no-SC path
        _close(off[1], with_sc[1], rel=1e-7)  # the same batch shapes: only the other row differs

        # Commit: a second encoder pass over the canvas appends to the cache like the reference.
        model.encode(canvas, cache)
        hf.model.encoder(input_ids=canvas, past_key_values=ref_cache)
        total = prompt_len + cfg.canvas_length
        for i in range(cfg.num_hidden_layers):
            ref_k = ref_cache.layers[i].keys
            _close(cache.k[i][:, :, total - ref_k.shape[2]:total], ref_k)


def test_layer_scalars_are_mode_specific(ckpt_factory):
    model = dgemma.load(ckpt_factory("tiny")).model
    enc = [float(layer.encoder_layer_scalar) for layer in model.layers]
    dec = [float(layer.layer_scalar) for layer in model.layers]
    assert enc == pytest.approx([0.6 + 0.1 * i for i in range(4)])
    assert dec == pytest.approx([1.3 - 0.1 * i for i in range(4)])


def test_sliding_window_only_matters_beyond_the_window(ckpt_factory, hf_model_factory):
    """Control: with a window wider than the context, sliding and full masking agree with the reference."""
    import copy

    from conftest import TINY, write_hf_checkpoint

    raw = copy.deepcopy(TINY)
    raw["text_config"]["sliding_window"] = 4096
    path = write_hf_checkpoint(ckpt_factory("tiny").parent / "wide", raw)
    hf, model = hf_model_factory(path), dgemma.load(path).model
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    canvas = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = KVCache(model.cfg, 1, 56)
        model.encode(ids, cache)
        ours = model.decode(canvas, cache)
        ref = hf(input_ids=ids, decoder_input_ids=canvas).logits
    _close(ours, ref)


def test_padded_batch_rows_keep_their_own_positions(ckpt_factory):
    """Right-padded prefill of rows with different lengths == each row encoded alone."""
    model = dgemma.load(ckpt_factory("tiny")).model
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 512, (n,), generator=g) for n in (7, 30, 19)]
    canvas = torch.randint(0, 512, (3, cfg.canvas_length), generator=g)
    with torch.no_grad():
        cache = KVCache(cfg, 3, 30 + cfg.canvas_length)
        ids = torch.zeros(3, 30, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        model.encode(ids, cache, n_valid=torch.tensor([7, 30, 19]))
        batched = model.decode(canvas, cache)
        for b, r in enumerate(rows):
            alone = KVCache(cfg, 1, len(r) + cfg.canvas_length)
            model.encode(r[None], alone)
            _close(model.decode(canvas[b:b + 1], alone)[0], batched[b])


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_deterministic_generate_is_token_identical(ckpt_factory, hf_model_factory, name):
    """One canvas from a given initial canvas at near-zero temperature: same tokens and step count."""
    hf, _ = _setup(ckpt_factory, hf_model_factory, name)
    engine = dgemma.load(ckpt_factory(name))
    cfg = engine.config
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, cfg.vocab_size, (1, 10 + 15 * seed), generator=g)
        init = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
        ref = hf.generate(prompt, decoder_input_ids=init.clone(), max_new_tokens=cfg.canvas_length,
                          t_max=2e-4, t_min=1e-4, eos_token_id=None, pad_token_id=None)
        out = engine.generate(prompt[0].tolist(), max_new_tokens=cfg.canvas_length, t_max=2e-4, t_min=1e-4,
                              initial_canvas=init[0].tolist(), eos_token_id=())
        assert out.token_ids == ref.sequences[0, prompt.shape[1]:].tolist()
        ref_steps = cfg.canvas_length / float(ref.tokens_per_forward[0])
        assert out.steps == [round(ref_steps)]
