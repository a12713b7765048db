"""Peak memory of loading a quantised model: quantising tensor by tensor as the checkpoint is read, against
loading the float model whole and quantising it after, and against loading a checkpoint written quantised.

A random bfloat16 checkpoint is written (once, into ``--dir``) for the 26B-A4B config cut to ``--layers``
layers: the full widths, 128 experts per layer and the 262k x 2816 embedding, so each tensor is as large as
in the real model and only the layer count is smaller. Each variant then runs in a fresh process that reports
its peak resident set (``VmHWM`` of /proc/self/status, the high-water mark of this process's own memory,
which counts the pages of a memory-mapped file that were read), and what is resident at the end, split into
anonymous memory and file pages:

* ``float``: ``dgemma.load(dtype=bfloat16)`` (the float model in memory);
* ``quantize after``: the same, then ``quantize_model`` (what ``load(quant=)`` did before it streamed);
* ``quantize while loading``: ``dgemma.load(dtype=bfloat16, quant=...)``;
* ``quantized checkpoint``: ``dgemma.load`` of the directory ``dgemma quantize`` wrote.

Every variant then reads each of its tensors once (``max``), so that the pages a checkpoint maps but has not
read yet (they come in on first use) are resident, as in a model that has run. Prints a table (peak RSS, the model's stored weight bytes, the checkpoint's size) and writes JSON.

    python benchmarks/quant_load_memory.py --layers 2 --scheme int4 --json docs/bench/quant-load-memory.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("float", "quantize after", "quantize while loading", "quantized checkpoint")


def cut_config(layers: int) -> dict:
    """The 26B-A4B config with its first ``layers`` layers (at least one full-attention layer among them)."""
    from dgemma.bench.presets import PRESETS

    raw = copy.deepcopy(PRESETS["26b-a4b"]())
    text = raw["text_config"]
    types = text["layer_types"][:layers]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    text["layer_types"], text["num_hidden_layers"] = types, layers
    text["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 2}
                                for i, t in enumerate(types) if t == "full_attention"}
    return raw


def predicted_bytes(layers: int, scheme: str) -> int:
    from dgemma.config import ModelConfig
    from dgemma.quant import accounting

    return accounting.total_bytes(ModelConfig.from_hf_dict(cut_config(layers)), scheme)


def write_checkpoint(path: Path, layers: int) -> None:
    from dgemma.config import ModelConfig
    from dgemma.loading import build_model, save_checkpoint

    if (path / "model.safetensors").is_file():
        return
    cfg = ModelConfig.from_hf_dict(cut_config(layers))
    model = build_model(cfg, device="cpu", dtype=torch.bfloat16, seed=0)
    save_checkpoint(model, path)


def measure(variant: str, path: Path, scheme: str) -> dict:
    """Runs in the child process: load as ``variant`` says, then report the peak RSS."""
    import dgemma
    from dgemma.quant import quantize_model, stored_bytes

    t0 = time.perf_counter()
    if variant == "quantized checkpoint":
        model = dgemma.load(path.with_name(path.name + f"-{scheme}"), dtype=torch.bfloat16).model
    elif variant == "quantize while loading":
        model = dgemma.load(path, dtype=torch.bfloat16, quant=scheme).model
    else:
        model = dgemma.load(path, dtype=torch.bfloat16).model
        if variant == "quantize after":
            model = quantize_model(model, scheme)
    for t in model.state_dict().values():  # read every page of what stays memory-mapped, as a first use would
        t.max()
    seconds = time.perf_counter() - t0
    status = _status()
    return {"peak_rss_bytes": status["VmHWM"], "end_anon_bytes": status["RssAnon"],
            "end_file_bytes": status["RssFile"], "stored_bytes": sum(stored_bytes(model).values()),
            "seconds": seconds}


def _status() -> dict[str, int]:
    """The kB fields of /proc/self/status, in bytes (ru_maxrss would carry the parent's peak over exec)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--scheme", default="int4", choices=("int8", "int4"))
    p.add_argument("--dir", type=Path, default=Path("/tmp/dgemma-quant-load"))
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    path = args.dir / f"26b-cut-{args.layers}"
    if args.child:
        print(json.dumps(measure(args.child, path, args.scheme)))
        return
    write_checkpoint(path, args.layers)
    qdir = path.with_name(path.name + f"-{args.scheme}")
    if not qdir.exists():
        subprocess.run([sys.executable, "-m", "dgemma", "quantize", str(path), str(qdir), "--scheme", args.scheme],
                       check=True)
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--scheme", args.scheme,
                              "--dir", str(args.dir), "--child", variant], check=True, capture_output=True, text=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:<24} peak RSS {r['peak_rss_bytes'] / 1e9:6.2f} GB  at the end: anonymous "
              f"{r['end_anon_bytes'] / 1e9:5.2f} GB, file {r['end_file_bytes'] / 1e9:5.2f} GB   weights "
              f"{r['stored_bytes'] / 1e9:5.2f} GB   {r['seconds']:6.1f} s", flush=True)
    files = {"float checkpoint": sum(f.stat().st_size for f in path.glob("*.safetensors")),
             f"{args.scheme} checkpoint": sum(f.stat().st_size for f in qdir.glob("*.safetensors"))}
    predicted = predicted_bytes(args.layers, args.scheme)
    print("  ".join(f"{k} {v / 1e9:.2f} GB" for k, v in files.items())
          + f"  (weights predicted by dgemma.quant.accounting: {predicted / 1e9:.3f} GB)")
    if args.json:
        from dgemma.fileio import atomic_write_text

        record = {"command": "python " + " ".join(sys.argv), "config": f"26b-a4b cut to {args.layers} layers",
                  "scheme": args.scheme, "variants": results, "files": files,
                  "predicted_weight_bytes": predicted,
                  "machine": {"platform": platform.platform(), "processor": platform.processor(),
                              "torch": torch.__version__, "python": platform.python_version()}}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
