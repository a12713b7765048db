"""ms per denoising step of a quantised model (``dgemma.quant``) against the unquantised one.

One step is what ``benchmarks/mask_ab.py`` times: the decoder pass over a ``--prompt``-token cache, then the
sampler (``dgemma.denoise.step_fused``: LM head, sampling, entropy, soft input) on its hidden states. The
variants, all built from one float model of a random-weight preset (deep copies, so the same weights):

* ``fp32``: the unquantised model in fp32, the baseline (the fast dtype on an AVX2 CPU: bf16 matmuls are
  emulated there, so bf16 is not the baseline);
* ``int8`` / ``int4``: ``quantize_model(scheme=...)`` with fp32 activations, the default paths (on the CPU the
  weight dequantised into a reused workspace, :mod:`dgemma.quant.kernels`, then one matmul);
* ``int8 ref`` / ``int4 ref``: the same with ``QuantizedWeight.fast = False``, the reference path (a fresh
  dequantised tensor per call, then the matmul): what the default paths are measured against;
* ``bf16``: the unquantised model in bf16 (emulated bf16 matmuls on AVX2);
* ``int8 bf16``: int8 with bf16 activations, the case that takes torch's ``_weight_int8pack_mm`` kernel.

``--kernels M [M ...]`` times, instead of steps, one product per weight shape of the preset with ``M`` rows of
fp32 activations (one thread is the fair setting): the fp32 matmul, both int8 and int4 paths, and the torch
kernels that were candidates (``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` with fp32
activations, and ``torch._int_mm``, int8 x int8, which is not weight-only), as ratios to the fp32 matmul.

The embedding (the tied LM head) stays in the model's dtype (``--embedding``, default ``bfloat16``, i.e. left
as it is). The variants alternate within each round (``--rounds``). ``--clock cpu`` times with the process's
CPU time instead of the wall clock: with one thread (``OMP_NUM_THREADS=1``) on cores that other jobs share,
it leaves out the time the process waits for a core. Prints ms per step, the ratio to fp32, the
weight bytes of each variant (``dgemma.quant.stored_bytes``), and writes the figures as JSON.

    python benchmarks/quant_step.py --preset small --batch 1 4 --rounds 5 --json docs/bench/quant-step-small-cpu.json
    python benchmarks/quant_step.py --preset small --kernels 64 256 1024 --json docs/bench/quant-step-small-cpu-kernels.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from dgemma import denoise
from dgemma.bench.harness import BenchSpec, build
from dgemma.cache import KVCache
from dgemma.fileio import atomic_write_text
from dgemma.quant import formats, kernels, quantize_model, stored_bytes
from dgemma.quant.modules import QuantizedWeight

# name -> (compute dtype, scheme or None, QuantizedWeight.fast)
VARIANTS = {"fp32": (torch.float32, None, None), "int8": (torch.float32, "int8", None),
            "int8 ref": (torch.float32, "int8", False), "int4": (torch.float32, "int4", None),
            "int4 ref": (torch.float32, "int4", False), "bf16": (torch.bfloat16, None, None),
            "int8 bf16": (torch.bfloat16, "int8", None)}
BASELINE = "fp32"


def variants(base: torch.nn.Module, names: list[str], group_size: int, embedding: str) -> dict[str, torch.nn.Module]:
    out = {}
    for name in names:
        dtype, scheme, fast = VARIANTS[name]
        m = copy.deepcopy(base).to(dtype)
        if scheme is not None:
            quantize_model(m, scheme, group_size=group_size, embedding=embedding)
        for q in m.modules():
            if isinstance(q, QuantizedWeight):
                q.fast = fast
        out[name] = m.eval()
    return out


def weight_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """The distinct ``(out, in)`` of the 2-D weights a quantisation replaces (one expert's for the experts)."""
    shapes = {tuple(p.shape[-2:]) for n, p in model.named_parameters()
              if p.dim() >= 2 and "embed" not in n and "router" not in n}
    return sorted(shapes)


def kernel_products(n: int, k: int, m: int, group_size: int) -> dict[str, callable]:
    """name -> a call computing ``x [m, k] @ W.T`` for a random ``W [n, k]`` on one path."""
    g = torch.Generator().manual_seed(n * 7919 + k)
    w, x = torch.randn(n, k, generator=g) * 0.05, torch.randn(m, k, generator=g)
    c8, s8 = formats.quantize_int8(w)
    c4, s4 = formats.quantize_int4(w, group_size)
    wf = formats.dequantize_int8(c8, s8)
    out = {"fp32": lambda: F.linear(x, wf),
           "int8 ref": lambda: F.linear(x, formats.dequantize_int8(c8, s8, x.dtype)),
           "int8": lambda: kernels.int8_linear(x, c8, s8),
           "int4 ref": lambda: F.linear(x, formats.dequantize_int4(c4, s4, k, group_size, x.dtype)),
           "int4": lambda: kernels.int4_linear(x, c4, s4, k, group_size)}
    aten = torch.ops.aten
    if hasattr(aten, "_weight_int8pack_mm"):
        out["torch int8pack fp32"] = lambda: aten._weight_int8pack_mm(x, c8, s8.float())
    if hasattr(aten, "_weight_int4pack_mm_for_cpu") and k % group_size == 0:
        packed = aten._convert_weight_to_int4pack_for_cpu(formats.unpack_int4(c4, k).int() + 8, 2)
        zeros = torch.stack([s4.float().T, torch.zeros(k // group_size, n)], -1).contiguous()  # [G, N, 2]
        out["torch int4pack fp32"] = lambda: aten._weight_int4pack_mm_for_cpu(x, packed, group_size, zeros)
    xi = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    out["torch _int_mm int8xint8"] = lambda: torch._int_mm(xi, c8.T)
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def kernel_table(shapes: list[tuple[int, int]], ms: list[int], rounds: int, group_size: int,
                 clock=time.perf_counter) -> list[dict]:
    """Per shape and row count: µs of the fp32 matmul and every path's ratio to it (interleaved rounds)."""
    rows = []
    for n, k in shapes:
        for m in ms:
            calls = kernel_products(n, k, m, group_size)
            reps = max(3, int(3e8 / (2 * m * n * k + 1e6)))
            spent = dict.fromkeys(calls, 0.0)
            for name, f in calls.items():  # warm-up: workspaces, first-call setup
                f()
            for r in range(rounds):
                for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                    t0 = clock()
                    for _ in range(reps):
                        calls[name]()
                    spent[name] += clock() - t0
            us = {name: t / rounds / reps * 1e6 for name, t in spent.items()}
            ratio = {name: t / us["fp32"] for name, t in us.items()}
            print(f"[{m}, {k}] x [{n}, {k}]: fp32 {us['fp32']:.0f} us; "
                  + ", ".join(f"{name} x{v:.2f}" for name, v in ratio.items() if name != "fp32"), flush=True)
            rows.append({"m": m, "n": n, "k": k, "us": us, "ratio_to_fp32": ratio})
    return rows


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="cpu: the process's CPU time (for one thread on shared cores)")
    ap.add_argument("--prompt", type=int, default=128, help="cached prompt tokens the decoder pass reads")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--group-size", type=int, default=64, help="int4 inputs per scale")
    ap.add_argument("--embedding", default="bfloat16", help="bfloat16 (left in the model's dtype) or int8")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--kernels", type=int, nargs="+", metavar="M",
                    help="time one product per weight shape with M rows instead of steps")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    names = list(dict.fromkeys([BASELINE] + args.variants))
    base, source = build(BenchSpec(preset=args.preset, device="cpu", dtype="float32"))
    cfg = base.cfg
    if args.kernels:
        table = kernel_table(weight_shapes(base), args.kernels, args.rounds, args.group_size,
                             CLOCKS[args.clock])
        if args.json:
            atomic_write_text(args.json, json.dumps(
                {"command": "python " + shlex.join(sys.argv), "what": "µs of one product x [M, K] @ W.T per weight "
                 "shape of the preset on each path, as ratios to the fp32 matmul", "preset": args.preset,
                 "group_size": args.group_size, "clock": args.clock, "threads": torch.get_num_threads(),
                 "torch": torch.__version__,
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": table}, indent=1) + "\n")
        return
    models = variants(base, names, args.group_size, args.embedding)
    del base
    weight_bytes = {k: sum(stored_bytes(m).values()) for k, m in models.items()}
    print(f"model: {source}; torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock")
    print("fp32 is the baseline: on this CPU (no AVX-512 BF16 / AMX) bf16 matmuls are emulated and slow; "
          "int8 takes the _weight_int8pack_mm kernel only with bf16 activations; 'ref': the reference path")
    print("weight bytes: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in weight_bytes.items()))
    g = torch.Generator().manual_seed(0)
    clock = CLOCKS[args.clock]
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
                t0 = clock()
                step(k)
                spent[k] += clock() - t0
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
        out = {"command": "python " + shlex.join(sys.argv),
               "what": "ms per denoising step (decoder pass over a cached prompt + step_fused) of the unquantised "
                       "model and its weight-only quantisations; fp32 is the baseline because on this AVX2 CPU "
                       "bf16 matmuls are emulated and slow, while int8 only takes the _weight_int8pack_mm kernel "
                       "with bf16 activations; fp32 int8 / int4 dequantise into a reused workspace "
                       "(dgemma.quant.kernels) then matmul, the 'ref' variants into a fresh tensor per call",
               "preset": args.preset, "source": source, "prompt": args.prompt, "rounds": args.rounds,
               "clock": args.clock,
               "group_size": args.group_size, "embedding": args.embedding,
               "variants": {k: {"dtype": str(VARIANTS[k][0]).removeprefix("torch."), "scheme": VARIANTS[k][1],
                                "fast": VARIANTS[k][2]} for k in names},
               "weight_bytes": weight_bytes, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
