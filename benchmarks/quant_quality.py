"""Logit error of the quantised formats against the float model, per model and scheme.

For each model (random-weight presets built by the benchmark harness, trained-like peaked embedding, or a
checkpoint such as the embedded Sudoku model), the reference is the bfloat16 weights computed in fp32 (the
model rounded to bf16 and back: what a bf16 checkpoint holds, without emulated bf16 matmuls on a CPU that
lacks them). Each quantised copy (``quantize_model``) gets the same prompts and canvases; the decoder's
logits (one step, no self-conditioning, after the prompt is encoded) are compared:

* ``rel_error``: ``||L_q - L_f|| / ||L_f||`` over all positions and the vocabulary;
* ``top1``: the fraction of canvas positions whose argmax token is the same;
* ``kl``: the mean ``KL(p_f || p_q)`` per position, in nats.

A control row per model adds Gaussian noise of int8's rounding size (``absmax / 127 / sqrt(12)`` per output
row) to the same float weights that int8 quantises: a random-weight model that turns this noise into a large
logit error is chaotic (errors grow through the layers), and its quantisation figures say little about a
trained model's, which is why the trained Sudoku model is measured beside the presets.

    python benchmarks/quant_quality.py --models tiny small sudoku --json docs/bench/quant-quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys

import torch

from dgemma.bench.harness import BenchSpec, build
from dgemma.cache import KVCache
from dgemma.fileio import atomic_write_text
from dgemma.quant import quantize_model

SCHEMES = ({"scheme": "int8"}, {"scheme": "int4"}, {"scheme": "int8", "embedding": "int8"},
           {"scheme": "int4", "embedding": "int8"})


def label(options: dict) -> str:
    return options["scheme"] + (" + int8 embedding" if options.get("embedding") == "int8" else "")


def reference_model(name: str) -> tuple[torch.nn.Module, str]:
    if name == "sudoku":
        from dgemma.embedded import default_model

        spec = BenchSpec(preset=None, checkpoint=str(default_model()))
    else:
        spec = BenchSpec(preset=name)
    model, source = build(spec)
    if name == "sudoku":
        source = "the embedded Sudoku model (dgemma/models/sudoku)"  # not this machine's path
    return model.to(torch.bfloat16).to(torch.float32).eval(), source


@torch.inference_mode()
def logits(model, prompt: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    cache = KVCache(model.cfg, prompt.shape[0], prompt.shape[1] + canvas.shape[1], device="cpu", dtype=model.dtype)
    model.encode(prompt, cache)
    return model.logits(model.decode_hidden(canvas, cache))  # [B, C, V] fp32


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    ref64, got64 = ref.double(), got.double()
    kl = torch.nn.functional.kl_div(got64.log_softmax(-1), ref64.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return {"rel_error": float((got64 - ref64).norm() / ref64.norm()),
            "top1": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
            "kl": float(kl.mean())}


@torch.no_grad()
def int8_sized_noise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with int8-rounding-sized Gaussian noise on the weights int8 quantises."""
    out, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    for name, p in out.named_parameters():
        if p.ndim >= 2 and "router" not in name and "embed_tokens" not in name:
            std = p.abs().amax(-1, keepdim=True) / 127 / 12 ** 0.5  # [..., out, 1]
            p.add_(torch.randn(p.shape, generator=g) * std)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "small", "sudoku"],
                    help="preset names, or sudoku (the embedded model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    print("| model | format | rel. logit error | top-1 agreement | KL (nats) |")
    print("|---|---|---|---|---|")
    for name in args.models:
        ref_model, source = reference_model(name)
        cfg = ref_model.cfg
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=g)
        canvas = torch.randint(0, cfg.vocab_size, (args.batch, cfg.canvas_length), generator=g)
        ref = logits(ref_model, prompt, canvas)
        for options in SCHEMES:
            q = quantize_model(copy.deepcopy(ref_model), **options)
            row = {"model": name, "source": source, "format": label(options),
                   "group_size": q.quantization["group_size"], **compare(ref, logits(q, prompt, canvas))}
            results.append(row)
            print(f"| {name} | {row['format']} | {row['rel_error']:.4f} | {row['top1']:.3f} | {row['kl']:.4f} |",
                  flush=True)
        row = {"model": name, "source": source, "format": "control: int8-sized noise",
               **compare(ref, logits(int8_sized_noise(ref_model), prompt, canvas))}
        results.append(row)
        print(f"| {name} | {row['format']} | {row['rel_error']:.4f} | {row['top1']:.3f} | {row['kl']:.4f} |", flush=True)
    if args.json:
        record = {"command": "python " + " ".join(sys.argv), "reference": "bf16 weights computed in fp32",
                  "batch": args.batch, "prompt": args.prompt, "results": results,
                  "machine": {"platform": platform.platform(), "torch": torch.__version__,
                              "python": platform.python_version(), "threads": torch.get_num_threads()}}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
