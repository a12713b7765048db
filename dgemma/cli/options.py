"""Options every model command shares (``--model``, ``--device``, ``--dtype``, sampling flags named as in
generation_config.json) and the one place that turns them into an Engine, with one-line errors."""

from __future__ import annotations

import argparse
from typing import Any

from dgemma.errors import DgemmaError

SAMPLING_OPTIONS = (("max_new_tokens", int), ("max_denoising_steps", int), ("entropy_bound", float),
                    ("t_max", float), ("t_min", float), ("stability_threshold", int),
                    ("confidence_threshold", float), ("restarts", int), ("restart_entropy", float),
                    ("seed", int))


def add_model_options(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    if model_required:
        p.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    else:
        p.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the denoising steps of a canvas from CUDA graphs (default: on with CUDA; "
                        "they need bf16 weights, other dtypes decode eagerly)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (generation_config.json names; default: the checkpoint's values)")
    for name, kind in SAMPLING_OPTIONS:
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, metavar=kind.__name__.upper())


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k, _ in SAMPLING_OPTIONS if getattr(args, k, None) is not None}


def model_source(args: argparse.Namespace) -> str:
    from dgemma.embedded import default_model

    return args.model or str(default_model())


def device_and_dtype(args: argparse.Namespace):
    """``--device`` / ``--dtype`` checked (one-line errors): a usable torch device and a float dtype or None."""
    import torch

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise DgemmaError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DgemmaError("--device cuda: this torch build or machine has no CUDA GPU")
    dtype = None
    if args.dtype:
        dtype = getattr(torch, args.dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise DgemmaError(f"--dtype {args.dtype!r} is not a floating-point torch dtype (float32, bfloat16, ...)")
    return device, dtype


def load_engine(args: argparse.Namespace):
    """The Engine for ``--model`` (or the embedded model); raises DgemmaError/ValueError on user mistakes."""
    import dgemma

    device, dtype = device_and_dtype(args)
    return dgemma.load(model_source(args), device=device, dtype=dtype,
                       cuda_graphs=getattr(args, "cuda_graphs", None))
