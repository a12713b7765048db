"""Weight-only quantisation (``dgemma.quant``): the formats' round trips and error bounds, the quantised weight
boundaries against the float ones holding the dequantised weights (exact up to float rounding), the int8
kernel against the reference path, the stored bytes against ``accounting``, the tiny models' logits against
the float model's, generation end to end, and the refusals. fp32 activations unless a test says otherwise."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dgemma
from dgemma.cache import KVCache
from dgemma.model.layers import TiedEmbedding
from dgemma.model.moe import Experts, experts_reference
from dgemma.quant import accounting, formats, modules, quantize_model, stored_bytes, stored_bytes_by_part
from dgemma.quant.modules import Int8Embedding, QuantizedExperts, QuantizedLinear, QuantizedWeight

# Measured relative error (Frobenius) of a quantised model's decoder logits against the float model's, random
# weights (tests/conftest.py), embedding bf16 / int8: tiny int8 0.044 / 0.062, int4 0.586 / 0.586; odd int8
# 0.055 / 0.051, int4 0.421 / 0.418; the embedded (trained) Sudoku model int8 0.033, int4 0.27. Random
# models amplify weight noise (random norms, scale-1.0 attention): per linear the error is ~0.5% (int8) and
# ~10% (int4), below. The bounds leave some room over the measurements.
LOGIT_BOUND = {"int8": 0.08, "int4": 0.75}


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def roundtrip(w, scheme, group_size=64):
    if scheme == "int8":
        codes, scale = formats.quantize_int8(w)
        return codes, scale, formats.dequantize_int8(codes, scale), scale[..., None].float().expand_as(w)
    codes, scale = formats.quantize_int4(w, group_size)
    per_element = scale.float().repeat_interleave(group_size, -1)[..., : w.shape[-1]]
    return codes, scale, formats.dequantize_int4(codes, scale, w.shape[-1], group_size), per_element


# ------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("shape", [(8, 64), (5, 47), (3, 6, 130), (1, 1)])
@pytest.mark.parametrize("scheme,group_size", [("int8", 64), ("int4", 64), ("int4", 7), ("int4", 1), ("int4", 200)])
def test_round_trip_error_is_at_most_half_a_scale(shape, scheme, group_size):
    w = gaussian(*shape) * 0.05
    w[..., 0, :] = 0.0  # an all-zero row: scale 0, exact
    codes, scale, back, s = roundtrip(w, scheme, group_size)
    assert scale.dtype == torch.bfloat16 and back.shape == w.shape
    assert ((back - w).abs() <= s / 2 * (1 + 1e-6)).all()
    assert back[..., 0, :].eq(0).all()
    rows, width = w.numel() // shape[-1], shape[-1]
    assert codes.numel() * codes.element_size() + scale.numel() * 2 == accounting.quantized_bytes(
        rows, width, scheme, group_size)
    if scheme == "int8":
        assert codes.dtype == torch.int8 and codes.shape == w.shape and int(codes.abs().max()) <= 127
    else:
        assert codes.dtype == torch.uint8 and codes.shape == (*shape[:-1], -(-width // 2))
        assert scale.shape == (*shape[:-1], -(-width // group_size))
        unpacked = formats.unpack_int4(codes, width)
        assert int(unpacked.abs().max()) <= 7 and unpacked.dtype == torch.int8


def test_the_largest_element_of_a_row_is_never_clipped():
    w = torch.tensor([[1.0, -0.3, 0.2], [-3.7, 0.1, 0.0]])  # absmax / 127 is not a bf16 number
    for scheme in ("int8", "int4"):
        _, _, back, s = roundtrip(w, scheme)
        assert ((back - w).abs() <= s / 2 * (1 + 1e-6)).all()


def test_int4_packing_round_trips():
    nibbles = torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(1))
    packed = formats.pack_int4(nibbles)
    assert packed.shape == (3, 5) and packed[0, 0] == nibbles[0, 0] | (nibbles[0, 1] << 4)
    assert torch.equal(formats.unpack_int4(packed, 9).long() + 8, nibbles)


# ------------------------------------------------------------------------------------- the weight boundaries
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linear_is_the_linear_of_the_dequantized_weight(scheme):
    lin = nn.Linear(72, 40, bias=False)
    with torch.no_grad():
        lin.weight.copy_(gaussian(40, 72) * 0.05)
    q = QuantizedLinear(lin, scheme, 64)
    x = gaussian(3, 5, 72, seed=1)
    w = q.q.dequantize(torch.float32)
    torch.testing.assert_close(q(x), F.linear(x, w), rtol=0, atol=0)
    err = (q(x) - lin(x)).norm() / lin(x).norm()  # the weight noise as the layer's output sees it
    assert err < {"int8": 0.01, "int4": 0.15}[scheme], float(err)
    assert q(x).shape == (3, 5, 40) and not list(q.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_the_reference_path(dtype):
    if modules._INT8_MM is None:
        pytest.skip("this torch has no _weight_int8pack_mm")
    qw = QuantizedWeight(gaussian(6, 40, 64) * 0.05, "int8")
    x = gaussian(7, 64, seed=2).to(dtype)
    qw.fast = False
    ref = qw.product(x, 3)
    qw.fast = True
    fast = qw.product(x, 3)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol * float(ref.abs().max()))
    assert fast.dtype == dtype
    qw.fast = None  # the default
    assert not modules.uses_int8_kernel(x, None)  # the default: off (it crashed on an AVX-512 Xeon)
    assert not modules.uses_int8_kernel(x.float().requires_grad_(), True)  # never under autograd
    # a width the kernel crashes on (K % 16 != 0) takes the reference path even when the kernel is asked for
    odd = QuantizedWeight(gaussian(6, 40, 72) * 0.05, "int8")
    y = gaussian(7, 72, seed=2).to(dtype)
    assert not modules.uses_int8_kernel(y, True)
    odd.fast = True
    asked = odd.product(y, 3)
    odd.fast = False
    assert torch.equal(asked, odd.product(y, 3))


def expert_pair(scheme, seed=0):
    """Float experts (5 of width 24, d = 48) holding the dequantised weights of their int4 (groups of 16) or
    int8 twin, and the twin."""
    e, d, i = 5, 48, 24
    float_experts = Experts(SimpleNamespace(num_experts=e, hidden_size=d, moe_intermediate_size=i))
    with torch.no_grad():
        float_experts.gate_up_proj.copy_(gaussian(e, 2 * i, d, seed=seed) * 0.1)
        float_experts.down_proj.copy_(gaussian(e, d, i, seed=seed + 1) * 0.1)
    q = QuantizedExperts(float_experts, scheme, 16)
    with torch.no_grad():  # the float module now holds the dequantised weights
        float_experts.gate_up_proj.copy_(q.gate_up.dequantize(torch.float32))
        float_experts.down_proj.copy_(q.down.dequantize(torch.float32))
    return float_experts, q


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_experts_equal_float_experts_holding_the_dequantized_weights(scheme):
    float_experts, q = expert_pair(scheme)
    assert not list(q.parameters())  # no float weights left: int8 codes or packed uint8 nibbles
    codes = {n: b for n, b in q.named_buffers() if n.endswith("codes")}
    assert {b.dtype for b in codes.values()} == {torch.int8 if scheme == "int8" else torch.uint8}
    assert codes["gate_up.codes"].shape[:2] == (5, 48) and codes["down.codes"].shape[:2] == (5, 48)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 48, generator=g)
    weights = torch.rand(11, 3, generator=g)
    idx = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(11)])
    want = float_experts(x, weights, idx)
    for grouped in (False, True):  # the loop over hit experts and grouped_mm (expert by expert on the CPU)
        q.grouped = grouped
        torch.testing.assert_close(q(x, weights, idx), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts_reference(q, x, weights, idx), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_int8_embedding_readers_equal_the_tied_embedding_of_the_dequantized_matrix(monkeypatch, fast):
    monkeypatch.setattr(modules, "EMBED_BLOCK", 64)  # several blocks, the last one short
    tied = TiedEmbedding(150, 24).requires_grad_(False)
    with torch.no_grad():
        tied.weight.copy_(gaussian(150, 24))
    q = Int8Embedding(tied)
    q.q.fast = fast
    with torch.no_grad():
        tied.weight.copy_(q.q.dequantize(torch.float32))
    ids, h = torch.tensor([[0, 149, 64], [3, 3, 100]]), gaussian(2, 3, 24, seed=4)
    assert torch.equal(q.lookup(ids), tied.lookup(ids)) and torch.equal(q(ids), tied(ids))
    torch.testing.assert_close(q.logits(h), tied.logits(h), rtol=1e-5, atol=1e-5)
    out, want = torch.empty(6, 40), torch.empty(6, 40)
    q.logits_block(h.reshape(6, 24), 60, 100, out)
    tied.logits_block(h.reshape(6, 24), 60, 100, want)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    probs = torch.softmax(gaussian(2, 3, 150, seed=5), -1)
    torch.testing.assert_close(q.soft_embed(probs), tied.soft_embed(probs), rtol=1e-5, atol=1e-6)
    assert q.dtype == torch.float32 and q.row_bytes == tied.row_bytes and q.num_embeddings == 150


# ------------------------------------------------------------------------------------------------ the model
def decoder_logits(model, seed=0):
    """Encode a 20-token prompt, then one decoder pass with self-conditioning logits: ``[2, C, V]`` fp32."""
    g = torch.Generator().manual_seed(seed)
    v, c = model.cfg.vocab_size, model.cfg.canvas_length
    prompt, canvas = torch.randint(3, v, (2, 20), generator=g), torch.randint(3, v, (2, c), generator=g)
    sc = torch.randn(2, c, v, generator=g)
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, 64, device="cpu", dtype=model.dtype)
        model.encode(prompt, cache)
        return model.decode(canvas, cache, sc_logits=sc)


def load_model(ckpt_factory, name, dtype="float32"):
    return dgemma.load(ckpt_factory(name), dtype=dtype).model


@pytest.mark.parametrize("name", ["tiny", "odd"])
@pytest.mark.parametrize("embedding", ["bfloat16", "int8"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_stored_bytes_equal_the_accounting(ckpt_factory, name, scheme, embedding):
    model = quantize_model(load_model(ckpt_factory, name, "bfloat16"), scheme, embedding=embedding)
    cfg = model.cfg  # odd's widths (24, 48, 72, 144) are not multiples of 64: the default group size is 8 there
    assert model.quantization["group_size"] == accounting.default_group_size(cfg) == (64 if name == "tiny" else 8)
    assert stored_bytes_by_part(model) == accounting.bytes_by_part(cfg, scheme, embedding)
    assert sum(stored_bytes(model).values()) == accounting.total_bytes(cfg, scheme, embedding)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == {t.name.removesuffix(".weight") for t in accounting.weight_tensors(cfg) if t.role == "linear"}
    assert all(isinstance(layer.router.proj, nn.Linear) for layer in model.layers)  # the router stays float
    assert all(isinstance(layer.experts, QuantizedExperts) for layer in model.layers)


def test_an_fp32_model_keeps_its_norms_at_fp32_and_quantizes_the_rest_to_the_accounting(ckpt_factory):
    model = quantize_model(load_model(ckpt_factory, "odd"), "int4", group_size=24, embedding="int8")
    got, want = stored_bytes_by_part(model), accounting.bytes_by_part(model.cfg, "int4", "int8", group_size=24)
    for part in ("experts", "attention", "dense_mlp", "self_conditioning", "embedding"):
        assert got[part] == want[part], part
    for part in ("router", "norms_scalars"):
        assert got[part] == 2 * want[part], part
    assert model.dtype == torch.float32 and model.quantization["group_size"] == 24


def dequantized_twin(model, quantized):
    """``model`` (float) with every quantised weight replaced by the dequantised values of ``quantized``."""
    state = model.state_dict()
    with torch.no_grad():
        for prefix, m in quantized.named_modules():
            if isinstance(m, QuantizedLinear):
                state[prefix + ".weight"].copy_(m.q.dequantize(torch.float32))
            elif isinstance(m, QuantizedExperts):
                state[prefix + ".gate_up_proj"].copy_(m.gate_up.dequantize(torch.float32))
                state[prefix + ".down_proj"].copy_(m.down.dequantize(torch.float32))
            elif isinstance(m, Int8Embedding):
                state[prefix + ".weight"].copy_(m.q.dequantize(torch.float32))
    return model


@pytest.mark.parametrize("name", ["tiny", "odd"])
@pytest.mark.parametrize("scheme,embedding", [("int8", "bfloat16"), ("int8", "int8"), ("int4", "bfloat16"),
                                              ("int4", "int8")])
def test_quantized_logits_against_the_float_model(ckpt_factory, name, scheme, embedding):
    float_logits = decoder_logits(load_model(ckpt_factory, name))
    model = quantize_model(load_model(ckpt_factory, name), scheme, embedding=embedding)
    logits = decoder_logits(model)
    # exact up to float rounding: the float model holding the dequantised weights
    twin = decoder_logits(dequantized_twin(load_model(ckpt_factory, name), model))
    torch.testing.assert_close(logits, twin, rtol=1e-4, atol=1e-4 * float(twin.abs().max()))
    rel = float((logits - float_logits).norm() / float_logits.norm())
    print(f"{name} {scheme} embedding={embedding}: logits relative error {rel:.4f}")
    assert 0 < rel < LOGIT_BOUND[scheme]


@pytest.mark.parametrize("scheme,dtype", [("int8", "float32"), ("int4", "float32"), ("int8", "bfloat16")])
def test_generation_runs_on_a_quantized_model(ckpt_factory, monkeypatch, scheme, dtype):
    """(By default no product takes torch's int8 kernel, ``_weight_int8pack_mm``: it crashed on an AVX-512 Xeon.)"""
    calls = []
    if modules._INT8_MM is not None:
        monkeypatch.setattr(modules, "_INT8_MM", lambda *a: calls.append(1) or torch.ops.aten._weight_int8pack_mm(*a))
    engine = dgemma.load(ckpt_factory("tiny"), dtype=dtype)
    quantize_model(engine.model, scheme, embedding="int8")
    out = engine.generate("Hello there", max_new_tokens=20, seed=0)
    assert not calls
    assert 0 < len(out.token_ids) <= 20 and out.steps
    assert engine.generate("Hello there", max_new_tokens=20, seed=0).token_ids == out.token_ids


def test_bad_options_are_one_clear_value_error(ckpt_factory):
    model = load_model(ckpt_factory, "tiny")
    for kw, match in (({"scheme": "int3"}, "int3"), ({"scheme": "int4", "group_size": 0}, "group_size"),
                      ({"scheme": "int4", "group_size": 2.5}, "group_size"), ({"embedding": "int4"}, "embedding")):
        with pytest.raises(ValueError, match=match):
            quantize_model(model, **kw)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing touched by a refusal
    quantize_model(model, "int8", embedding="bf16")
    assert isinstance(model.embed_tokens, TiedEmbedding)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_load_quantizes_while_loading(ckpt_factory, scheme):
    engine = dgemma.load(ckpt_factory("tiny"), dtype="bfloat16", quant=scheme)
    model = engine.model
    assert model.quantization == {"scheme": scheme, "group_size": 64, "embedding": "bfloat16"}
    assert sum(stored_bytes(model).values()) == accounting.total_bytes(model.cfg, scheme)
    assert engine.generate("Hello there", max_new_tokens=8, seed=0).token_ids
    with pytest.raises(ValueError, match="int3"):  # refused before anything loads
        dgemma.load("/no/such/checkpoint", quant="int3")
