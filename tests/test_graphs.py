"""CUDA-graph decoder steps (dgemma.graphs): the split of a decoder pass into host and device parts, the
eager fallback off CUDA, and, where a GPU is present, graphs against the eager path."""

import pytest
import torch

import dgemma
from dgemma.cache import KVCache
from dgemma.engine import Engine
from dgemma.graphs import GraphedDecoder


@pytest.fixture(scope="module")
def engine(ckpt_factory):
    return dgemma.load(ckpt_factory("tiny"))


@torch.inference_mode()
def test_decode_inputs_and_decode_with_make_decode_hidden(engine):
    m = engine.model
    cache = KVCache(m.cfg, 2, 64)
    m.encode(torch.randint(3, 500, (2, 11)), cache, n_valid=torch.tensor([11, 7]))  # rows of unequal length
    canvas = torch.randint(3, 500, (2, m.cfg.canvas_length))
    soft = torch.randn(2, m.cfg.canvas_length, m.cfg.hidden_size)
    positions, kv = m.decode_inputs(cache, m.cfg.canvas_length)
    assert positions.tolist() == [list(range(11, 27)), list(range(7, 23))]
    assert torch.equal(m.decode_with(canvas, positions, kv, soft), m.decode_hidden(canvas, cache, soft))


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_zero_soft_embedding_is_exactly_the_pass_without_one(ckpt_factory, dtype):
    """What lets the first step of a canvas replay the graph of the others (zero self-conditioning input)."""
    m = dgemma.load(ckpt_factory("tiny"), dtype=dtype).model
    cache = KVCache(m.cfg, 2, 64, dtype=dtype)
    m.encode(torch.randint(3, 500, (2, 11)), cache, n_valid=torch.tensor([11, 7]))
    canvas = torch.randint(3, 500, (2, m.cfg.canvas_length))
    zero = torch.zeros(2, m.cfg.canvas_length, m.cfg.hidden_size, dtype=dtype)
    assert torch.equal(m.decode_hidden(canvas, cache, zero), m.decode_hidden(canvas, cache, None))
    soft = torch.randn(2, m.cfg.canvas_length, m.cfg.hidden_size, dtype=dtype)
    assert not torch.equal(m.decode_hidden(canvas, cache, soft), m.decode_hidden(canvas, cache, None))


def test_embed_scale_is_rounded_to_the_weight_dtype(engine):
    m = engine.model
    assert m.embed_scale() == float(torch.tensor(m.cfg.embed_scale, dtype=m.dtype))
    ids = torch.randint(0, 500, (3, 5))
    assert torch.equal(m.embed(ids), m.embed_tokens(ids) * torch.tensor(m.cfg.embed_scale, dtype=m.dtype))


def test_off_cuda_the_graphed_decoder_is_the_eager_model(engine):
    assert engine.runner is engine.model  # graphs are on by default on CUDA only
    g = GraphedDecoder(engine.model)
    canvas = torch.zeros(1, engine.config.canvas_length, dtype=torch.long)
    assert not g.capturable(canvas) and g.cfg is engine.model.cfg
    graphed = Engine(engine.model, engine.tokenizer, defaults=engine.defaults, cuda_graphs=True)
    assert isinstance(graphed.runner, GraphedDecoder)
    a = engine.generate(["Hello there", "Hi"], max_new_tokens=40, seed=3)
    b = graphed.generate(["Hello there", "Hi"], max_new_tokens=40, seed=3)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert graphed.runner.captures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_eager_tokens(ckpt_factory):
    graphed = dgemma.load(ckpt_factory("tiny"), device="cuda", dtype="bfloat16")  # graphs: on by default
    assert isinstance(graphed.runner, GraphedDecoder)
    eager = Engine(graphed.model, graphed.tokenizer, defaults=graphed.defaults, cuda_graphs=False)
    # Fixed steps (every step after the first replays) and adaptive stopping (rows drop out), unequal prompts.
    for kw in ({"confidence_threshold": 0.0, "max_denoising_steps": 6}, {}):
        prompts = ["Hello there, how are you", "Hi", [2, 7, 9, 11]]
        a = eager.generate(prompts, max_new_tokens=48, seed=5, **kw)
        b = graphed.generate(prompts, max_new_tokens=48, seed=5, **kw)
        again = eager.generate(prompts, max_new_tokens=48, seed=5, **kw)  # no atomics: eager repeats itself
        assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in again]
        assert [x.steps for x in a] == [x.steps for x in b]
    assert graphed.runner.disabled is None
    assert graphed.runner.captures >= 1 and graphed.runner.replays > graphed.runner.captures


@torch.inference_mode()
def test_static_decoder_kv_sees_what_the_sliced_one_sees(ckpt_factory):
    """The length-free K/V of a graph that outlives its canvas against DecoderKV (the reference): rows of
    unequal length, shorter and longer than the sliding window (7), before and after a commit, and a cache
    smaller than the window. In float64: the point is that both mask the same keys, and fp32 sums over
    key sets of other lengths round by the CPU's kernel order (1e-6 of the largest element)."""
    from dgemma.model.diffusion_gemma import StaticDecoderKV

    f64 = torch.float64
    m = dgemma.load(ckpt_factory("odd"), dtype=f64).model
    c, w = m.cfg.canvas_length, m.cfg.sliding_window

    def close(got, want):  # fp32 islands (RMSNorm, RoPE) remain: room for one flipped fp32 rounding there
        assert got.dtype == want.dtype == f64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))

    cache = KVCache(m.cfg, 3, 60, dtype=f64)
    m.encode(torch.randint(3, 389, (3, 11)), cache, n_valid=torch.tensor([11, 4, 9]))
    kv = StaticDecoderKV(cache, c, w, m.device)
    assert kv.win == w - 1 and kv.positions[1].tolist() == list(range(4, 4 + c))
    for _ in range(2):  # then again after a commit of different lengths
        canvas = torch.randint(3, 389, (3, c))
        soft = torch.randn(3, c, m.cfg.hidden_size, dtype=f64)
        ref = m.decode_hidden(canvas, cache, soft)
        kv.update(cache)
        close(m.decode_with(canvas, kv.positions, kv, soft), ref)
        m.encode(torch.randint(3, 389, (3, 5)), cache, n_valid=torch.tensor([5, 2, 3]))
    small = KVCache(m.cfg, 1, 4, dtype=f64)  # capacity under the window
    m.encode(torch.randint(3, 389, (1, 3)), small)
    kv = StaticDecoderKV(small, c, w, m.device)
    canvas = torch.randint(3, 389, (1, c))
    close(m.decode_with(canvas, kv.positions, kv, None), m.decode_hidden(canvas, small))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_reused_graph_serves_every_canvas(ckpt_factory):
    from dgemma.model.diffusion_gemma import StaticDecoderKV

    eager = dgemma.load(ckpt_factory("tiny"), device="cuda", dtype="bfloat16", cuda_graphs=False)
    m = eager.model
    with torch.inference_mode():  # one replay against the same length-free pass run eagerly: bitwise
        cache = KVCache(m.cfg, 2, 96, device="cuda", dtype=torch.bfloat16)
        m.encode(torch.randint(3, 500, (2, 30), device="cuda"), cache, n_valid=torch.tensor([30, 9]))
        canvas = torch.randint(3, 500, (2, m.cfg.canvas_length), device="cuda")
        g = GraphedDecoder(m, reuse=True)
        for _ in range(2):  # then the same graph after a commit: the lengths are refilled, not stale
            out = g.decode_hidden(canvas, cache)
            kv = StaticDecoderKV(cache, m.cfg.canvas_length, m.cfg.sliding_window, m.device)
            assert torch.equal(out, m.decode_with(canvas, kv.positions, kv, torch.zeros_like(out)))
            m.encode(torch.randint(3, 500, (2, 16), device="cuda"), cache, n_valid=torch.tensor([16, 5]))
        assert g.captures == 1 and g.replays == 2
    reuse = Engine(m, eager.tokenizer, defaults=eager.defaults, cuda_graphs=False)
    reuse.runner = GraphedDecoder(m, reuse=True)
    prompts = ["Hello there, how are you", "Hi", [2, 7, 9, 11]]
    kw = dict(max_new_tokens=3 * m.cfg.canvas_length, eos_token_id=(), seed=5, confidence_threshold=0.0,
              max_denoising_steps=4)
    a, b = reuse.generate(prompts, **kw), reuse.generate(prompts, **kw)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    r = reuse.runner
    assert r.disabled is None and r.captures == 2 and r.replays == 2 * 3 * 4  # one graph per generate
