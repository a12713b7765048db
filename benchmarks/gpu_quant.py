"""ms per denoising step of the 26B-A4B config in bf16, int8 and int4 on one GPU, against each format's bandwidth
floor (for when a GPU is lent; runs on a CPU too, e.g. ``--preset small --device cpu``, as a check).

A model of random bf16 weights is built on the device from a seed (52 GB for the full config, never copied):
bf16 is timed, then the model is quantised in place to int8 (``quantize_model``: each float tensor is freed as
its codes are made) and timed; a second model from the same seed is quantised to int4 and timed. One step is
the decoder pass over a ``--prompt``-token cache plus the sampler's ``step_fused``, at each batch size.

The floor is the bytes one step must read (``dgemma.bench.flops.decode_bytes``: touched weights, embedding,
K/V) divided by the measured copy rate, with the quantised parts (attention, dense MLP, self-conditioning,
experts) at their stored bytes per weight from ``dgemma.quant.accounting``.

    python benchmarks/gpu_quant.py --preset 26b-a4b --batch 1 4 --json OUT/gpu-quant-26b.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from dgemma import denoise
from dgemma.bench import flops
from dgemma.bench.measure import mean_ms, memory_rate
from dgemma.bench.presets import preset_config
from dgemma.cache import KVCache
from dgemma.fileio import atomic_write_text
from dgemma.loading import build_model
from dgemma.quant import accounting, quantize_model

QUANTISED_PARTS = ("experts", "attention", "dense_mlp", "self_conditioning")


def floor_bytes(cfg, batch: int, prompt: int, fmt: str) -> int:
    """Least bytes of one step in ``fmt``: bf16's, with the quantised parts scaled to their stored size."""
    bf16 = flops.decode_bytes(cfg, [prompt] * batch, True, 2)
    if fmt == "bfloat16":
        return bf16
    full, quant = accounting.bytes_by_part(cfg, "bfloat16"), accounting.bytes_by_part(cfg, fmt)
    ratio = sum(quant[p] for p in QUANTISED_PARTS) / sum(full[p] for p in QUANTISED_PARTS)
    embed = 2 * cfg.vocab_size * cfg.hidden_size * 2  # LM head and soft embedding, kept bf16
    kv = flops.decode_bytes(cfg, [prompt] * batch, True, 2) - flops.decode_bytes(cfg, [0] * batch, True, 2)
    weights = bf16 - embed - kv
    return int(weights * ratio + embed + kv)


@torch.inference_mode()
def time_steps(model, batches: list[int], prompt: int, seed: int) -> dict[int, float]:
    cfg, out = model.cfg, {}
    for b in batches:
        g = torch.Generator(device=model.device).manual_seed(seed)
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), generator=g, device=model.device)
        canvas = torch.randint(0, cfg.vocab_size, (b, cfg.canvas_length), generator=g, device=model.device)
        u = torch.rand(b, cfg.canvas_length, generator=g, device=model.device)
        cache = KVCache(cfg, b, prompt + cfg.canvas_length, device=model.device, dtype=model.dtype)
        model.encode(ids, cache)

        def step() -> None:
            denoise.step_fused(model, model.decode_hidden(canvas, cache), 0.5, u)

        out[b] = mean_ms(step, reps=5, warmup=2)
        del cache
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="26b-a4b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    rate = memory_rate(torch.device(args.device))
    rows = []
    for fmt in ("bfloat16", "int8", "int4"):
        model = build_model(cfg, device=args.device, dtype=torch.bfloat16, seed=args.seed, embed_std=1.0)
        if fmt != "bfloat16":
            quantize_model(model, fmt)
        for b, ms in time_steps(model, args.batch, args.prompt, args.seed).items():
            floor = 1000 * floor_bytes(cfg, b, args.prompt, fmt) / rate
            rows.append({"format": fmt, "batch": b, "ms": ms, "floor_ms": floor})
            print(f"{fmt:<9} batch {b}: {ms:8.2f} ms/step, floor {floor:7.2f} ms (x{ms / floor:.1f})", flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        record = {"command": "python " + " ".join(sys.argv), "preset": args.preset, "prompt": args.prompt,
                  "copy_rate_bytes_per_s": rate, "rows": rows, "torch": torch.__version__,
                  "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
