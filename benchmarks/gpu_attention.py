"""Attention of one 26B-A4B decoder pass, SDPA's grouped mode against folded query groups.

The decoder attends a 256-token canvas over the cache: full layers have 16 query heads over 2 K/V heads of
width 512, sliding layers 16 over 8 of width 256. With ``enable_gqa`` SDPA on CUDA has no fused kernel for
a width of 512, nor for a mask (rows of unequal length, the encoder's causal mask), so it takes the math
kernel. ``Attention.gqa_mode`` runs it as plain attention instead: query groups folded into rows, or K/V
repeated per head. For the decoder's and the encoder's shapes this prints the relative error of the plain
pass against the grouped one (in fp32 on the same inputs) and both times.

    python benchmarks/gpu_attention.py                      # on the GPU
    python benchmarks/gpu_attention.py --device cpu --prompt-len 64   # a dry run of the code
"""

from __future__ import annotations

import argparse

import torch

from dgemma.bench.measure import mean_ms
from dgemma.bench.presets import preset_config
from dgemma.model.layers import Attention


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
        n = args.prompt_len
        # decoder: the canvas over the cache (one row, no mask; two rows, one shorter: a mask per key);
        # encoder: the prompt over itself, a causal (and on sliding layers windowed) mask per query row
        cases = [("decoder", 1, c, c + (min(n, cfg.sliding_window) if spec.is_sliding else n), "keys"),
                 ("decoder", 2, c, c + (min(n, cfg.sliding_window) if spec.is_sliding else n), "keys"),
                 ("encoder", 1, n, n, "causal")]
        for mode, batch, queries, keys, masking in cases:
            q = torch.randn(batch, attn.n_heads, queries, attn.head_dim, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(batch, attn.n_kv, keys, attn.head_dim, device=dev, dtype=torch.bfloat16)
                    for _ in range(2))
            mask = None
            if masking == "causal":
                pos = torch.arange(n, device=dev)
                diff = pos[:, None] - pos[None, :]
                mask = (diff >= 0) & ((diff < cfg.sliding_window) if spec.is_sliding else True)
                mask = mask[None, None].expand(batch, 1, n, n)
            elif batch > 1:  # the second row's cache is shorter: its first slots are empty
                mask = torch.ones(batch, 1, 1, keys, device=dev, dtype=torch.bool)
                mask[1, ..., : keys // 3] = False
            outs, times = {}, {}
            for plain in (False, True):
                attn.plain_gqa = plain
                times[plain] = mean_ms(lambda: attn.attend(q, k, v, mask), reps=20)
                attn.float()
                outs[plain] = attn.attend(q.float(), k.float(), v.float(), mask)
                attn.to(torch.bfloat16)
            err = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
            attn.plain_gqa = True
            how = attn.gqa_mode(q, mask)
            print(f"{'sliding' if spec.is_sliding else 'full'} layer (head dim {attn.head_dim}, "
                  f"{attn.n_heads}/{attn.n_kv} heads), {mode}, batch {batch}, {queries} queries over {keys} "
                  f"keys, mask {mask is not None}: grouped {times[False]:.3f} ms, {how} {times[True]:.3f} ms "
                  f"(x{times[False] / times[True]:.2f}), fp32 relative error {err:.1e}")

if __name__ == "__main__":
    main()
