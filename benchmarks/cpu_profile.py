"""Where one denoising step of a random-weight model spends its time on the CPU.

Builds the model (preset ``small`` by default, fp32), prefills a prompt, then profiles with torch.profiler
one decoder pass with self-conditioning input and one fused step (LM head, entropy, argmax, sample and
soft embedding) at the given batch, printing the wall time of each and the operators that dominated.

    python benchmarks/cpu_profile.py                       # small, fp32, batch 1, prompt 128
    python benchmarks/cpu_profile.py --batch 4 --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch

from dgemma import loading
from dgemma.bench.measure import mean_ms
from dgemma.bench.presets import preset_config
from dgemma.cache import KVCache
from dgemma.denoise import step_fused


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=12, help="operators to list per table")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = preset_config(args.preset)
    model = loading.build_model(cfg, device="cpu", dtype=dtype, seed=0, embed_std=1.0)
    b, n, c = args.batch, args.prompt_len, cfg.canvas_length
    cache = KVCache(cfg, b, n + c, device="cpu", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    model.encode(torch.randint(3, cfg.vocab_size, (b, n), generator=g), cache)
    canvas = torch.randint(3, cfg.vocab_size, (b, c), generator=g)
    u = torch.rand(b, c, generator=g)
    h = model.decode_hidden(canvas, cache)
    soft = step_fused(model, h, 0.8, u).soft

    print(f"{args.preset}, {args.dtype}, batch {b}, {torch.get_num_threads()} threads")
    print(f"decoder pass: {mean_ms(lambda: model.decode_hidden(canvas, cache, soft), 5):.1f} ms; "
          f"fused step: {mean_ms(lambda: step_fused(model, h, 0.8, u), 5):.1f} ms")
    from torch.profiler import ProfilerActivity, profile

    for name, fn in (("decoder pass", lambda: model.decode_hidden(canvas, cache, soft)),
                     ("fused step", lambda: step_fused(model, h, 0.8, u))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n{name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
