"""A/B of the denoising step with and without an allowed-token mask (``dgemma.constraints``).

Times ``dgemma.denoise.step_fused`` (the sampler's part of a step: LM head, mask, sampling, entropy, soft
input) on the same hidden states of a random-weight preset, alternating three variants per round: no
mask, every position under one of a few allowed sets (what a JSON schema gives: a small set such as
digits, a large one such as string-safe tokens, single-token sets), and the same with half the positions
unconstrained. The decoder pass (over a ``--prompt``-token cache) is timed in the same rounds, so the
overhead is given on the sampler part and on the whole step (decoder pass + sampler). Prints ms per step
and writes the figures as JSON.

    python benchmarks/mask_ab.py --preset small --batch 1 4 --rounds 10 --json docs/bench/mask-ab-small-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dgemma import denoise
from dgemma.cache import KVCache
from dgemma.bench.harness import BenchSpec, build
from dgemma.fileio import atomic_write_text


def masks(n: int, c: int, vocab: int, g: torch.Generator) -> dict[str, dict]:
    """Step keyword arguments per variant: ``set_index [n, C]`` rows of ``table [S, V]``."""
    table = torch.zeros(4, vocab, dtype=torch.bool)
    table[0, 100:110] = True  # ten tokens (digits)
    table[1] = torch.rand(vocab, generator=g) < 0.9  # most of the vocabulary (string-safe tokens)
    table[2, 7] = table[3, 8] = True  # single tokens (structure)
    every = torch.randint(0, 4, (n, c), generator=g)
    half = every.clone()
    half[:, ::2] = -1
    return {"none": {}, "all positions": {"set_index": every, "table": table},
            "half the positions": {"set_index": half, "table": table}}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=128, help="cached prompt tokens the decoder pass reads")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    model, _ = build(BenchSpec(preset=args.preset, device=args.device, dtype=args.dtype))
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(max(args.batch), cfg.canvas_length, cfg.hidden_size, generator=g).to(model.device, model.dtype)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    rows = []
    for b in args.batch:
        h, u = hidden[:b], torch.rand(b, cfg.canvas_length, generator=g)
        variants = masks(b, cfg.canvas_length, cfg.vocab_size, g)
        cache = KVCache(cfg, b, args.prompt + cfg.canvas_length, device=model.device, dtype=model.dtype)
        model.encode(torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=g).to(model.device), cache)
        canvas = torch.randint(0, cfg.vocab_size, (b, cfg.canvas_length), generator=g).to(model.device)
        spent = dict.fromkeys(variants, 0.0)
        decoder = 0.0
        for kw in variants.values():  # warm-up
            denoise.step_fused(model, h, args.temperature, u, **kw)
        model.decode_hidden(canvas, cache)
        for _ in range(args.rounds):
            sync()
            t0 = time.perf_counter()
            model.decode_hidden(canvas, cache)
            sync()
            decoder += time.perf_counter() - t0
            for name, kw in variants.items():
                sync()
                t0 = time.perf_counter()
                denoise.step_fused(model, h, args.temperature, u, **kw)
                sync()
                spent[name] += time.perf_counter() - t0
        ms = {k: v / args.rounds * 1000 for k, v in spent.items()}
        dec = decoder / args.rounds * 1000
        base = ms["none"]
        print(f"batch {b}: decoder pass {dec:.2f} ms; sampler: " + ", ".join(
            f"{k} {v:.2f} ms" + ("" if k == "none" else f" ({v / base - 1:+.1%}, whole step "
                                                         f"{(v - base) / (dec + base):+.1%})")
            for k, v in ms.items()))
        rows.append({"batch": b, "decoder_ms": dec, "sampler_ms": ms,
                     "sampler_overhead": {k: v / base - 1 for k, v in ms.items() if k != "none"},
                     "step_overhead": {k: (v - base) / (dec + base) for k, v in ms.items() if k != "none"}})
    if args.json:
        out = {"command": "python benchmarks/mask_ab.py " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
            if k != "json" and v is not None),
            "what": "ms per denoising step: the decoder pass, and the sampler (step_fused: hidden states -> "
                    "decision) with no mask against an allowed-token mask on every / half the canvas positions; "
                    "step overhead = extra sampler time / (decoder pass + unmasked sampler)",
            "preset": args.preset, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
