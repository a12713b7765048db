"""Do CUDA graphs change what the decoder computes, or only the run-to-run noise of the eager path?

On a random model of a preset (default ``small``; ``26b-a4b`` is the released config) on the GPU, for each
dtype asked for, with and without deterministic algorithms:
* the hidden states of one decoder pass: eager twice (the eager path's own spread), then replayed from a
  graph, each against the first eager pass (max abs difference, 0 = bitwise equal);
* the same pass over the length-free K/V of a reused graph (``StaticDecoderKV``) eagerly, and replayed
  from a reused graph against that;
* generate: eager twice, graphed, and with one graph reused by every canvas, the rows whose tokens equal
  the first eager run's.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python benchmarks/gpu_graphs_check.py
    CUBLAS_WORKSPACE_CONFIG=:4096:8 python benchmarks/gpu_graphs_check.py --preset 26b-a4b --dtypes bfloat16
    python benchmarks/gpu_graphs_check.py --preset tiny        # off CUDA: a dry run of the code
"""

from __future__ import annotations

import argparse
import gc

import torch

from dgemma.bench.presets import preset_config
from dgemma.cache import KVCache
from dgemma.engine import Engine
from dgemma.graphs import GraphedDecoder
from dgemma.loading import build_model
from dgemma.model.diffusion_gemma import StaticDecoderKV

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # off CUDA: a dry run of the code


def check(preset: str, dtype: torch.dtype, deterministic: bool) -> None:
    torch.use_deterministic_algorithms(deterministic)
    model = build_model(preset_config(preset), device=DEV, dtype=dtype, seed=0, embed_std=1.0)
    cfg = model.cfg
    with torch.inference_mode():
        cache = KVCache(cfg, 3, 64 + cfg.canvas_length, device=DEV, dtype=dtype)
        g = torch.Generator(device=DEV).manual_seed(0)
        model.encode(torch.randint(3, cfg.vocab_size, (3, 50), device=DEV, generator=g), cache,
                     n_valid=torch.tensor([50, 37, 20], device=DEV))
        canvas = torch.randint(3, cfg.vocab_size, (3, cfg.canvas_length), device=DEV, generator=g)
        soft = torch.randn(3, cfg.canvas_length, cfg.hidden_size, device=DEV, dtype=dtype, generator=g)
        ref = model.decode_hidden(canvas, cache, soft).float()
        again = model.decode_hidden(canvas, cache, soft).float()
        graphed = GraphedDecoder(model)
        first = graphed.decode_hidden(canvas, cache, soft).float()  # captured, then replayed
        replay = graphed.decode_hidden(canvas, cache, soft).float()
        diffs = [(x - ref).abs().max().item() for x in (again, first, replay)]
        reused = GraphedDecoder(model, reuse=True)
        kv = StaticDecoderKV(cache, cfg.canvas_length, cfg.sliding_window, model.device)
        static = model.decode_with(canvas, kv.positions, kv, soft).float()
        diffs += [(static - ref).abs().max().item(), (reused.decode_hidden(canvas, cache, soft).float()
                                                      - static).abs().max().item()]
    eager, graphs = Engine(model, cuda_graphs=False), Engine(model, cuda_graphs=True)
    reuse = Engine(model, cuda_graphs=False)
    reuse.runner = GraphedDecoder(model, reuse=True)
    prompts = [list(range(3, 40)), list(range(5, 25)), [7] * 50]
    kw = dict(max_new_tokens=512, eos_token_id=(), seed=1, confidence_threshold=0.0, max_denoising_steps=8)
    a, b, c, d = (e.generate(prompts, **kw) for e in (eager, eager, graphs, reuse))
    same = lambda x, y: sum(r.token_ids == s.token_ids for r, s in zip(x, y))  # noqa: E731
    print(f"{preset} {str(dtype):15} deterministic {deterministic!s:5}: one pass, max |diff| vs eager: eager again "
          f"{diffs[0]:.2e}, graph {diffs[1]:.2e}, replay {diffs[2]:.2e}, length-free eager {diffs[3]:.2e} "
          f"(reused graph vs it {diffs[4]:.2e}); generate, rows equal to eager: eager again {same(a, b)}/3, "
          f"graphs {same(a, c)}/3 ({graphs.runner.captures} captures, disabled: {graphs.runner.disabled}), "
          f"one reused graph {same(a, d)}/3 ({reuse.runner.captures} captures, disabled: {reuse.runner.disabled})")
    torch.use_deterministic_algorithms(False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="model config (default small; 26b-a4b: the released one)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"] if DEV == "cuda" else ["bfloat16"])
    args = ap.parse_args()
    for dtype in (getattr(torch, name) for name in args.dtypes):
        for deterministic in (False, True):
            try:
                check(args.preset, dtype, deterministic)
            except RuntimeError as e:  # an op with no deterministic implementation names itself
                print(f"{args.preset} {dtype} deterministic {deterministic}: {str(e).splitlines()[0]}")
            gc.collect()  # one model at a time: the 26B config holds 52 GB in bf16
            if DEV == "cuda":
                torch.cuda.empty_cache()
