"""A/B of the fused denoising step: ``dgemma/denoise.py`` at a git revision against the working tree.

Loads ``step_fused`` from ``git show REV:dgemma/denoise.py`` (or from a file, where ``--base`` names one:
for machines that get the working tree without ``.git``) and from the current package, then alternates
the two on the same hidden states of a random-weight preset (batch 1 and 4), printing ms per step of each,
the ratio, and how far their results are apart (tokens, entropy, soft embedding).

    python benchmarks/step_ab.py --base HEAD~1
    python benchmarks/step_ab.py --base 888b5f1 --preset small --temperature 0.8 --rounds 8
    git show a375eff~1:dgemma/denoise.py > base_denoise.py   # then, on a GPU machine:
    python benchmarks/step_ab.py --base base_denoise.py --preset 26b-a4b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import types

import torch

from dgemma import denoise
from dgemma.bench.harness import BenchSpec, build


def load_old(rev: str):
    if os.path.isfile(rev):
        with open(rev) as f:
            src = f.read()
    else:
        src = subprocess.run(["git", "show", f"{rev}:dgemma/denoise.py"], check=True, capture_output=True,
                             text=True).stdout
    mod = types.ModuleType("denoise_old")
    exec(compile(src, f"{rev}:dgemma/denoise.py", "exec"), mod.__dict__)
    return mod.step_fused


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    old, new = load_old(args.base), denoise.step_fused
    model, _ = build(BenchSpec(preset=args.preset, device=args.device, dtype=args.dtype))
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(max(args.batch), cfg.canvas_length, cfg.hidden_size, generator=g).to(model.device, model.dtype)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for b in args.batch:
        h, u, t = hidden[:b], torch.rand(b, cfg.canvas_length, generator=g), args.temperature
        spent = {"base": 0.0, "new": 0.0}
        for f in (old, new):
            f(model, h, t, u)
        for _ in range(args.rounds):
            for name, f in (("base", old), ("new", new)):
                sync()
                t0 = time.perf_counter()
                f(model, h, t, u)
                sync()
                spent[name] += time.perf_counter() - t0
        a, c = old(model, h, t, u), new(model, h, t, u)
        ms = {k: v / args.rounds * 1000 for k, v in spent.items()}
        print(f"batch {b}: {args.base} {ms['base']:.0f} ms, working tree {ms['new']:.0f} ms per step, "
              f"x{ms['base'] / ms['new']:.2f}; argmax equal {(a.argmax == c.argmax).float().mean():.4f}, "
              f"samples equal {(a.sampled == c.sampled).float().mean():.4f}, "
              f"max entropy diff {(a.entropy - c.entropy).abs().max():.2e}, "
              f"max soft diff {(a.soft.float() - c.soft.float()).abs().max():.2e}")


if __name__ == "__main__":
    main()
