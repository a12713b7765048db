"""``dgemma quantize MODEL OUT --scheme int8|int4``: write a quantised checkpoint (``dgemma.quant.checkpoint``).

The float checkpoint is read tensor by tensor and each weight quantised as it is read (``loading.load_weights``
with ``quant``), so the float model is never whole in memory; the float tensors that stay float keep the
checkpoint's dtype (``--dtype`` to change it). The output is written beside ``OUT`` and renamed into place
when complete, with the generation config and the tokenizer, and loads with ``dgemma.load(OUT)``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-only quantised checkpoint (int8 or int4, experts included)")
    p.add_argument("model", help="float checkpoint directory or Hugging Face repo id")
    p.add_argument("out", help="new directory for the quantised checkpoint")
    p.add_argument("--scheme", required=True, metavar="int8|int4",
                   help="int8: one scale per output row; int4: one scale per group of inputs (symmetric)")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="int4 inputs per scale; must divide the weights' widths (default 64, or the largest power "
                        "of two below it that does)")
    p.add_argument("--embedding", default="bfloat16", metavar="bfloat16|int8",
                   help="the tied embedding / LM head: kept float (default) or int8")
    p.add_argument("--dtype", default=None, help="dtype of the tensors that stay float (default: the checkpoint's)")


def run(parser, args) -> int:
    import torch
    from rich.console import Console

    from dgemma import loading
    from dgemma.errors import DgemmaError
    from dgemma.quant import accounting, checkpoint
    from dgemma.quant.apply import QuantOptions, quantize_model
    from dgemma.tokenizer import Tokenizer

    options = QuantOptions.of({"scheme": args.scheme, "embedding": args.embedding,
                               **({"group_size": args.group_size} if args.group_size is not None else {})})
    if args.group_size is not None and args.scheme != "int4":
        raise DgemmaError("--group-size applies to int4 only (int8 has one scale per output row)")
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DgemmaError(f"{out} already exists and is not an empty directory; choose a new one")
    ckpt = loading.resolve_source(args.model)
    if out.resolve() == ckpt.resolve():
        raise DgemmaError("OUT must be a new directory, not the checkpoint being quantised")
    stored = checkpoint.read_section(loading.read_json(ckpt / "config.json"))
    if stored is not None:
        raise DgemmaError(f"{ckpt} is already quantised ({stored.scheme}); quantise its float original instead")
    dtype = loading.stored_dtype(ckpt)
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DgemmaError(f"--dtype {args.dtype!r} is not a floating-point torch dtype (bfloat16, float32, ...)")
    quantize_model(loading.meta_model(loading.read_config(ckpt)), **options.as_dict())  # options vs the shapes
    t0 = time.perf_counter()
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"quantising to {options.scheme}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("read", total=None)
        model, cfg, generation_config, _ = loading.load_weights(
            ckpt, device="cpu", dtype=dtype, quant=options,
            progress=lambda done, total: bar.update(task, completed=done, total=total))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    loading.save_checkpoint(model, partial, generation_config)
    if (ckpt / "tokenizer.json").is_file():
        Tokenizer.from_dir(ckpt).save(partial)
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    written = (out / checkpoint.WEIGHTS_FILE).stat().st_size
    group_size = model.quantization["group_size"]
    predicted = accounting.total_bytes(cfg, options.scheme, options.embedding, group_size)
    print(f"wrote {out}: {options.scheme}"
          + (f" (group size {group_size})" if options.scheme == "int4" else "")
          + f", embedding {options.embedding}; {checkpoint.WEIGHTS_FILE} {_size(written)} (the weights with their "
          f"float parts in bfloat16: {_size(predicted)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
