"""``dgemma train`` and ``dgemma merge``: argument parsing and error reporting for the training commands.

User mistakes (bad config, bad data line, missing files) print one line and exit with status 2.
Multi-process: ``torchrun --nproc_per_node N -m dgemma train CONFIG`` (FSDP2; see docs/TRAINING.md).
"""

from __future__ import annotations

import json

from dgemma.cli.options import add_threads_option, set_threads
from dgemma.errors import DgemmaError


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train or fine-tune (full or LoRA) from a TOML config",
                       description="Train from a TOML config; --set overrides any key, e.g. --set train.lr=3e-4")
    t.add_argument("config", nargs="?", help="training config (TOML); optional if --set gives everything")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); the value is read as TOML")
    t.add_argument("--out", help="output directory (same as --set train.out=...)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output directory")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="log lines instead of a progress bar")
    add_threads_option(t)
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model (release format)")
    m.add_argument("adapter", help="adapter directory written by dgemma train")
    m.add_argument("--base", help="base checkpoint (default: the one recorded in the adapter)")
    m.add_argument("--out", required=True, help="directory for the merged checkpoint")
    m.add_argument("--dtype", help="dtype of the written weights (default: the base checkpoint's)")


def run(parser, args) -> int:
    try:
        if args.command == "merge":
            return _merge(args)
        return _train(args)
    except (DgemmaError, ValueError, OSError) as e:
        parser.exit(2, f"dgemma: {e}\n")


def _train(args) -> int:
    from dgemma.train import config, dist, launch

    overrides = list(args.overrides) + ([f"train.out={json.dumps(args.out)}"] if args.out else [])
    cfg = config.load(args.config, overrides)
    set_threads(args)
    words = ["train", *([args.config] if args.config else []), *[w for o in args.overrides for w in ("--set", o)],
             *(["--out", args.out] if args.out else []), *(["--no-progress"] if args.progress is False else []),
             *(["--threads", str(args.threads)] if args.threads is not None else [])]
    env = dist.setup(cfg.train.device)
    try:
        result, status = launch.train(cfg, env, args.resume, words, show_progress=args.progress)
    finally:
        dist.teardown()
    if env.main and result is not None:
        last = result.history[-1] if result.history else {}
        summary = {"out": str(result.out), "final": str(result.final) if result.final else None,
                   "adapter": str(result.adapter) if result.adapter else None, "step": result.step,
                   "loss": last.get("loss"), "eval": result.evals[-1] if result.evals else None,
                   "trainable_parameters": result.trainable_parameters,
                   "peak_memory_bytes": result.peak_memory_bytes}
        print(json.dumps(summary))
    return status


def _merge(args) -> int:
    from dgemma.train import lora
    from dgemma.train.model_setup import merge_adapter

    base = args.base or lora.base_of(args.adapter)
    if not base:
        raise DgemmaError(f"{args.adapter} does not record its base model; pass --base")
    dtype = None
    if args.dtype:
        import torch

        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DgemmaError(f"--dtype {args.dtype!r} is not a floating-point torch dtype (e.g. bfloat16)")
    out = merge_adapter(base, args.adapter, args.out, dtype=dtype)
    print(out)
    return 0
