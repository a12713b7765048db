"""ms per denoising step of a quantised model (``dgemma.quant``) against the unquantised one.

One step is what ``benchmarks/mask_ab.py`` times: the decoder pass over a ``--prompt``-token cache, then the
sampler (``dgemma.denoise.step_fused``: LM head, sampling, entropy, soft input) on its hidden states. The
variants, all built from one float model of a random-weight preset (deep copies, so the same weights):

* ``fp32``: the unquantised model in fp32, the baseline (the fast dtype on an AVX2 CPU: bf16 matmuls are
  emulated there, so bf16 is not the baseline);
* ``int8`` / ``int4``: ``quantize_model(scheme=...)`` with fp32 activations (both dequantise, then matmul);
* ``bf16``: the unquantised model in bf16 (emulated bf16 matmuls on AVX2);
* ``int8 bf16``: int8 with bf16 activations, the only case that takes torch's ``_weight_int8pack_mm`` kernel.

The embedding (the tied LM head) stays in the model's dtype (``--embedding``, default ``bfloat16``, i.e. left
as it is). The variants alternate within each round (``--rounds``). Prints ms per step, the ratio to fp32, the
weight bytes of each variant (``dgemma.quant.stored_bytes``), and writes the figures as JSON.

    python benchmarks/quant_step.py --preset small --batch 1 4 --rounds 5 --json docs/bench/quant-step-small-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import torch

from dgemma import denoise
from dgemma.bench.harness import BenchSpec, build
from dgemma.cache import KVCache
from dgemma.fileio import atomic_write_text
from dgemma.quant import quantize_model, stored_bytes

# name -> (compute dtype, scheme or None)
VARIANTS = {"fp32": (torch.float32, None), "int8": (torch.float32, "int8"), "int4": (torch.float32, "int4"),
            "bf16": (torch.bfloat16, None), "int8 bf16": (torch.bfloat16, "int8")}
BASELINE = "fp32"


def variants(base: torch.nn.Module, names: list[str], group_size: int, embedding: str) -> dict[str, torch.nn.Module]:
    out = {}
    for name in names:
        dtype, scheme = VARIANTS[name]
        m = copy.deepcopy(base).to(dtype)
        if scheme is not None:
            quantize_model(m, scheme, group_size=group_size, embedding=embedding)
        out[name] = m.eval()
    return out


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128, help="cached prompt tokens the decoder pass reads")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--group-size", type=int, default=64, help="int4 inputs per scale")
    ap.add_argument("--embedding", default="bfloat16", help="bfloat16 (left in the model's dtype) or int8")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    names = list(dict.fromkeys([BASELINE] + args.variants))
    base, source = build(BenchSpec(preset=args.preset, device="cpu", dtype="float32"))
    cfg = base.cfg
    models = variants(base, names, args.group_size, args.embedding)
    del base
    weight_bytes = {k: sum(stored_bytes(m).values()) for k, m in models.items()}
    print(f"model: {source}; torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    print("fp32 is the baseline: on this CPU (no AVX-512 BF16 / AMX) bf16 matmuls are emulated and slow; "
          "int8 takes the _weight_int8pack_mm kernel only with bf16 activations")
    print("weight bytes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in weight_bytes.items()))
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in args.batch:
        prompt = torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=g)
        canvas = torch.randint(0, cfg.vocab_size, (b, cfg.canvas_length), generator=g)
        u = torch.rand(b, cfg.canvas_length, generator=g)
        caches = {}
        for k, m in models.items():
            caches[k] = KVCache(cfg, b, args.prompt + cfg.canvas_length, device=m.device, dtype=m.dtype)
            m.encode(prompt, caches[k])

        def step(k: str) -> None:
            h = models[k].decode_hidden(canvas, caches[k])
            denoise.step_fused(models[k], h, args.temperature, u)

        for k in models:  # warm-up
            step(k)
        spent = dict.fromkeys(models, 0.0)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for k in order:
                t0 = time.perf_counter()
                step(k)
                spent[k] += time.perf_counter() - t0
        ms = {k: v / args.rounds * 1000 for k, v in spent.items()}
        ratio = {k: v / ms[BASELINE] for k, v in ms.items()}
        print(f"batch {b}: " + ", ".join(f"{k} {ms[k]:.1f} ms (x{ratio[k]:.2f})" for k in names), flush=True)
        rows.append({"batch": b, "ms": ms, "ratio_to_fp32": ratio})
    print()
    print("| batch | variant | ms/step | vs fp32 | weight MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        for k in names:
            print(f"| {row['batch']} | {k} | {row['ms'][k]:.1f} | x{row['ratio_to_fp32'][k]:.2f} | "
                  f"{weight_bytes[k] / 2**20:.1f} |")
    if args.json:
        out = {"command": "python " + " ".join(sys.argv),
               "what": "ms per denoising step (decoder pass over a cached prompt + step_fused) of the unquantised "
                       "model and its weight-only quantisations; fp32 is the baseline because on this AVX2 CPU "
                       "bf16 matmuls are emulated and slow, while int8 only takes the _weight_int8pack_mm kernel "
                       "with bf16 activations (fp32 int8 / int4 dequantise then matmul)",
               "preset": args.preset, "source": source, "prompt": args.prompt, "rounds": args.rounds,
               "group_size": args.group_size, "embedding": args.embedding,
               "variants": {k: {"dtype": str(VARIANTS[k][0]).removeprefix("torch."), "scheme": VARIANTS[k][1]}
                            for k in names},
               "weight_bytes": weight_bytes, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
