"""Attention of one 26B-A4B decoder pass, SDPA's grouped mode against folded query groups (issue 3).

The decoder attends a 256-token canvas over the cache: full layers have 16 query heads over 2 K/V heads of
width 512, sliding layers 16 over 8 of width 256. With ``enable_gqa`` SDPA on CUDA has no fused kernel for
a width of 512, nor for a mask (rows of unequal length), so it takes the math kernel. ``Attention.folds``
turns the query groups into rows instead. For each shape this prints the relative error of the folded pass
against the grouped one (in fp32 on the same inputs) and both times.

    python benchmarks/gpu_attention.py                      # on the GPU
    python benchmarks/gpu_attention.py --device cpu --prompt-len 64   # a dry run of the code
"""

from __future__ import annotations

import argparse
import time

import torch

from dgemma.bench.presets import preset_config
from dgemma.model.layers import Attention


def timed_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=4096)
    args = ap.parse_args()
    cfg = preset_config("26b-a4b")
    dev, c = torch.device(args.device), cfg.canvas_length
    for spec in (next(s for s in cfg.layers if s.is_sliding), next(s for s in cfg.layers if not s.is_sliding)):
        attn = Attention(cfg, spec).to(dev, torch.bfloat16)
        keys = c + (min(args.prompt_len, cfg.sliding_window) if spec.is_sliding else args.prompt_len)
        for batch, masked in ((1, False), (2, True)):
            q = torch.randn(batch, attn.n_heads, c, attn.head_dim, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, attn.n_kv, keys, attn.head_dim, device=dev, dtype=torch.bfloat16)
                    for _ in range(2))
            mask = None
            if masked:  # the second row's cache is shorter: its first slots are empty
                mask = torch.ones(batch, 1, 1, keys, device=dev, dtype=torch.bool)
                mask[1, ..., : keys // 3] = False
            outs, times = {}, {}
            for fold in (False, True):
                attn.fold_gqa = fold
                times[fold] = timed_ms(lambda: attn.attend(q, k, v, mask))
                attn.float()
                outs[fold] = attn.attend(q.float(), k.float(), v.float(), mask)
                attn.to(torch.bfloat16)
            err = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
            print(f"{'sliding' if spec.is_sliding else 'full'} layer (head dim {attn.head_dim}, "
                  f"{attn.n_heads}/{attn.n_kv} heads), batch {batch}, {keys} keys, mask {masked}: "
                  f"grouped {times[False]:.3f} ms, folded {times[True]:.3f} ms "
                  f"(x{times[False] / times[True]:.2f}), fp32 relative error {err:.1e}")


if __name__ == "__main__":
    main()
