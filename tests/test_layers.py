"""Building blocks: fast paths against their slow references, RoPE against the spec's formulas."""

import torch

from dgemma.config import ModelConfig, RopeSpec
from dgemma.model.layers import apply_rope, rms_norm, rope_inv_freq
from dgemma.model.moe import _GROUPED_MM, Experts, Router, combine, experts_reference
from conftest import ODD


def test_grouped_experts_match_the_reference_loop():
    cfg = ModelConfig.from_hf_dict(ODD)
    torch.manual_seed(0)
    experts, router = Experts(cfg), Router(cfg)
    for p in (experts.gate_up_proj, experts.down_proj):
        torch.nn.init.normal_(p, std=0.2)
    torch.nn.init.normal_(router.per_expert_scale, mean=1.0, std=0.3)
    x = torch.randn(37, cfg.hidden_size)
    w, idx = router(x)
    assert idx.shape == (37, cfg.top_k_experts)
    slow = experts_reference(experts, x, w, idx)
    assert slow.abs().max() > 0.1
    paths = (False, True) if _GROUPED_MM is not None else (False,)  # grouped_mm: torch >= 2.8
    for grouped in paths:  # the per-expert loop (CPU path) and the grouped GEMM (CUDA path)
        experts.grouped = grouped
        fast = experts(x, w, idx)
        assert torch.allclose(fast, slow, atol=1e-5), grouped
    # an expert no token picked (an empty group) must not disturb the others
    idx = idx.clamp(max=cfg.num_experts - 2)
    slow = experts_reference(experts, x, w, idx)
    assert torch.allclose(experts(x, w, idx), slow, atol=1e-5)


def test_both_expert_combines_sum_each_tokens_slots():
    """The gather (CUDA: no atomics) and the index_add_ (CPU) combines against a plain per-token sum."""
    torch.manual_seed(0)
    n, k, d = 9, 3, 5
    idx = torch.randint(0, 4, (n, k))
    order = torch.argsort(idx.reshape(-1), stable=True)
    pairs = torch.randn(n, k, d)  # each (token, slot) pair's result
    ys = pairs.reshape(n * k, d)[order]  # in expert order, as Experts.forward has them
    for gather in (True, False):
        torch.testing.assert_close(combine(ys, order, k, gather), pairs.sum(1))
    half = combine(ys.bfloat16(), order, k, gather=True)  # accumulated in fp32, rounded once
    assert half.dtype == torch.bfloat16 and torch.equal(half, ys.bfloat16()[torch.argsort(order)].view(n, k, d)
                                                        .float().sum(1).bfloat16())


def test_router_renormalises_then_applies_per_expert_scale():
    cfg = ModelConfig.from_hf_dict(ODD)
    router = Router(cfg)
    torch.nn.init.normal_(router.proj.weight)
    with torch.no_grad():
        router.per_expert_scale.copy_(torch.arange(1.0, cfg.num_experts + 1))
    w, idx = router(torch.randn(5, cfg.hidden_size))
    # dividing out each expert's gain leaves renormalised top-k probabilities that sum to 1
    assert torch.allclose((w / (idx + 1).float()).sum(-1), torch.ones(5), atol=1e-6)
    assert not torch.allclose(w.sum(-1), torch.ones(5))  # the gain is applied after renormalising


def test_proportional_rope_rotates_only_the_leading_pairs():
    inv = rope_inv_freq(RopeSpec("proportional", 1e6, 0.25), 512)
    assert inv.shape == (256,)
    assert torch.allclose(inv[:64], 1e6 ** (-torch.arange(0, 128, 2).float() / 512))  # exponent over 512
    assert (inv[64:] == 0).all()
    x = torch.randn(1, 3, 2, 512)
    freqs = torch.tensor([[0.0, 5.0, 9.0]])[..., None] * inv
    emb = torch.cat([freqs, freqs], -1)
    y = apply_rope(x, emb.cos(), emb.sin())
    untouched = torch.cat([torch.arange(64, 256), torch.arange(320, 512)])
    assert torch.equal(y[..., untouched], x[..., untouched])
    assert torch.allclose(y[:, 0], x[:, 0])  # position 0 is the identity
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4)  # a rotation


def test_default_rope_frequencies():
    inv = rope_inv_freq(RopeSpec("default", 1e4), 256)
    assert torch.allclose(inv, 1e4 ** (-torch.arange(0, 256, 2).float() / 256))


@torch.inference_mode()
def test_plain_grouped_query_attention_matches_the_reference(ckpt_factory):
    """``plain_gqa`` (the CUDA path) against SDPA's own grouped mode: folded in the decoder (masked and not),
    expanded in the encoder (a causal mask per query row)."""
    import dgemma
    from dgemma.cache import KVCache

    m = dgemma.load(ckpt_factory("odd"), dtype=torch.float32).model
    attn = [layer.self_attn for layer in m.layers]
    assert all(a.n_kv != a.n_heads for a in attn) and {a.head_dim for a in attn} == {12, 24}
    q = torch.randn(2, attn[0].n_heads, 5, 12)
    assert attn[0].gqa_mode(q, None) == "grouped"  # off CUDA the reference path runs unless asked
    attn[0].plain_gqa = True
    assert attn[0].gqa_mode(q, None) == attn[0].gqa_mode(q, torch.ones(2, 1, 1, 9, dtype=torch.bool)) == "fold"
    assert attn[0].gqa_mode(q, torch.ones(2, 1, 5, 9, dtype=torch.bool)) == "expand"
    attn[0].plain_gqa = None

    def run(plain):
        for a in attn:
            a.plain_gqa = plain
        cache = KVCache(m.cfg, 2, 40)
        lengths = torch.tensor([11, 6])  # unequal rows: the decoder masks the short one's empty slots
        enc = m.encode(torch.randint(3, 389, (2, 11)), cache, n_valid=lengths)
        canvas = torch.randint(3, 389, (2, m.cfg.canvas_length))
        masked = m.decode_hidden(canvas, cache)
        one = KVCache(m.cfg, 1, 40)
        m.encode(torch.randint(3, 389, (1, 9), generator=torch.Generator().manual_seed(1)), one)
        return enc, masked, m.decode_hidden(canvas[:1], one)  # one row: no mask at all

    torch.manual_seed(0)
    ref = run(False)
    torch.manual_seed(0)
    fast = run(True)
    for a, b in zip(ref, fast):
        assert a.abs().max() > 0.1
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)


def test_rms_norm_has_the_bits_of_the_literal_formula():
    """The spec's formula, step by step in fp32, then one rounding: the fused multiply must match it bit
    for bit, with and without autograd, and its gradients must too."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 7, 64, dtype=dtype) * 3
        w = (1 + 0.3 * torch.randn(64)).to(dtype)
        xf = x.float()
        literal = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        with torch.no_grad():
            assert torch.equal(rms_norm(x, w, 1e-6), (literal * w.float()).to(dtype))
            assert torch.equal(rms_norm(x, None, 1e-6), literal.to(dtype))
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = rms_norm(xg, wg, 1e-6)
        xrf = xr.float()
        ref = (xrf * torch.pow(xrf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * wr.float()).to(dtype)
        assert torch.equal(out, ref)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        assert torch.equal(xg.grad, xr.grad) and torch.equal(wg.grad, wr.grad)
