"""A/B of the fused denoising step's probabilities: ``exp(log_softmax)`` (before) against ``softmax`` (now).

Rebuilds the old variant from the current source with the one line swapped, then alternates the two on
the same hidden states of the ``small`` preset (random weights), batch 1 and 4, and checks that they give
the same tokens. Run: ``python benchmarks/step_softmax_ab.py``.
"""
import inspect, time, torch, textwrap
from dgemma.bench.harness import BenchSpec, build
from dgemma import denoise
src = textwrap.dedent(inspect.getsource(denoise.step_fused)).replace("p = torch.softmax(z, dim=-1)", "p = logp.exp()").replace("def step_fused", "def step_old")
ns = dict(vars(denoise)); exec(src, ns); old = ns["step_old"]
model, _ = build(BenchSpec(preset="small")); model.eval()
cfg = model.cfg
torch.manual_seed(0)
with torch.inference_mode():
    cache_h = torch.randn(4, cfg.canvas_length, cfg.hidden_size)
    for b in (1, 4):
        h, u = cache_h[:b], torch.rand(b, cfg.canvas_length)
        t = {"old": 0.0, "new": 0.0}
        for _ in range(2): old(model, h, 0.5, u); denoise.step_fused(model, h, 0.5, u)
        for r in range(6):  # alternate
            for name, f in (("old", old), ("new", denoise.step_fused)):
                t0 = time.perf_counter(); f(model, h, 0.5, u); t[name] += time.perf_counter() - t0
        a, bb = old(model, h, 0.5, u), denoise.step_fused(model, h, 0.5, u)
        same = torch.equal(a.argmax, bb.argmax) and torch.equal(a.sampled, bb.sampled)
        print(f"batch {b}: exp(log_softmax) {t['old']/6*1000:.0f} ms, softmax {t['new']/6*1000:.0f} ms per step, x{t['old']/t['new']:.2f}; same tokens: {same}; max entropy diff {(a.entropy-bb.entropy).abs().max():.2e}; soft diff {(a.soft-bb.soft).abs().max():.2e}")
