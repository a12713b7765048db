"""Options every model command shares (``--model``, ``--device``, ``--dtype``, sampling flags named as in
generation_config.json) and the one place that turns them into an Engine, with one-line errors."""

from __future__ import annotations

import argparse
from typing import Any

SAMPLING_OPTIONS = (("max_new_tokens", int), ("max_denoising_steps", int), ("entropy_bound", float),
                    ("t_max", float), ("t_min", float), ("stability_threshold", int),
                    ("confidence_threshold", float), ("seed", int))


def add_model_options(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    if model_required:
        p.add_argument("model", help="checkpoint directory or Hugging Face repo id")
    else:
        p.add_argument("--model", help="checkpoint directory or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (generation_config.json names; default: the checkpoint's values)")
    for name, kind in SAMPLING_OPTIONS:
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, metavar=kind.__name__.upper())


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k, _ in SAMPLING_OPTIONS if getattr(args, k, None) is not None}


def model_source(args: argparse.Namespace) -> str:
    from dgemma.embedded import default_model

    return args.model or str(default_model())


def load_engine(args: argparse.Namespace):
    """The Engine for ``--model`` (or the embedded model); raises DgemmaError/ValueError on user mistakes."""
    import dgemma

    return dgemma.load(model_source(args), device=args.device, dtype=args.dtype)
